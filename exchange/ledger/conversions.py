"""Conversion records: their postings and rows, reading them back, and reversing one.

Conversions themselves are decided by the one engine (exchange/domain/decider.py) and written by
exchange/ledger/conversion_store.py; this module holds what both a conversion and its reversal
write — the four postings of DESIGN §2, the conversion row, the events — and the reversal, which
takes its locks in the engine's order: member rows by merchant id, then position rows by
merchant id (the clearing fence is a shared lock that never waits on a row).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from exchange.domain import errors
from exchange.domain.conversion import ConversionAmounts
from exchange.domain.models import ConversionRecord
from exchange.domain.units import format_operation_id
from exchange.ledger import accounts, points, positions
from exchange.store import fences, outbox
from exchange.store.schema import conversions
from exchange.store.schema import members as members_table
from exchange.store.schema import merchants as merchants_table

DAY_MS = 86_400_000


def _move_member_points(conn: Connection, debit: tuple[str, str, int], credit: tuple[str, str, int]) -> None:
    """Debit one member and credit another, taking the two row locks in merchant-id order."""
    if debit[0] <= credit[0]:
        points.debit_member(conn, *debit)
        points.credit_member(conn, *credit)
    else:
        points.credit_member(conn, *credit)
        points.debit_member(conn, *debit)


def _move_positions(conn: Connection, payer: str, payer_amount: int, payee: str, payee_amount: int) -> None:
    """Payer's position down, payee's up (no cap: undoing), row locks in merchant-id order."""
    for merchant_id in sorted((payer, payee)):
        positions.add(conn, merchant_id, payee_amount if merchant_id == payee else -payer_amount)


# Built once (hot path): statement building and cache keys cost more than the database's work.
_RECORD = insert(conversions)
_MERCHANT_ACCOUNTS = select(
    merchants_table.c.merchant_id, merchants_table.c.issuance_account_id, merchants_table.c.clearing_account_id
).where(merchants_table.c.merchant_id.in_(bindparam("pair", expanding=True)))
_MEMBER_ACCOUNTS = select(members_table.c.merchant_id, members_table.c.account_id).where(
    ((members_table.c.merchant_id == bindparam("s")) & (members_table.c.member_ref == bindparam("s_ref")))
    | ((members_table.c.merchant_id == bindparam("d")) & (members_table.c.member_ref == bindparam("d_ref")))
)


def _accounts(conn: Connection, record: ConversionRecord) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """Both merchants' (issuance, clearing) accounts and both members' accounts, in two queries."""
    pair = [record.source_merchant_id, record.destination_merchant_id]
    merchant_accounts = {
        m: (int(issuance), int(clearing)) for m, issuance, clearing in conn.execute(_MERCHANT_ACCOUNTS, {"pair": pair})
    }
    member_accounts = {
        merchant: int(account_id)
        for merchant, account_id in conn.execute(
            _MEMBER_ACCOUNTS,
            {"s": pair[0], "s_ref": record.src_member_ref, "d": pair[1], "d_ref": record.dst_member_ref},
        )
    }
    return merchant_accounts, member_accounts


def _post(conn: Connection, seq: int, record: ConversionRecord, *, reverse: bool) -> None:
    """The four postings of DESIGN §2; a reversal posts each in the opposite direction."""
    source, destination = record.source_merchant_id, record.destination_merchant_id
    merchant_accounts, member_accounts = _accounts(conn, record)
    platform = accounts.get_or_create_account(conn, accounts.cash_asset(record.currency), "platform")
    legs = posting_legs(
        record, merchant_accounts[source], merchant_accounts[destination],
        (member_accounts[source], member_accounts[destination]), platform, reverse=reverse,
    )  # fmt: skip
    accounts.post_many(conn, seq, legs)


def posting_legs(
    record: ConversionRecord,
    source_accounts: tuple[int, int],
    destination_accounts: tuple[int, int],
    member_accounts: tuple[int, int],
    platform: int,
    *,
    reverse: bool,
) -> list[tuple[str, int, int, int]]:
    """(asset, debit, credit, amount) of each non-zero posting; a reversal swaps every side.

    Accounts: each merchant's (issuance, clearing), the (source, destination) members' accounts.
    """
    (src_issuance, src_clearing), (dst_issuance, dst_clearing) = source_accounts, destination_accounts
    amounts, cash = record.amounts, accounts.cash_asset(record.currency)
    legs = [
        (accounts.points_asset(record.source_merchant_id), member_accounts[0], src_issuance, amounts.src_points),
        (accounts.points_asset(record.destination_merchant_id), dst_issuance, member_accounts[1], amounts.dst_points),
        (cash, src_clearing, dst_clearing, amounts.dst_cash),
        (cash, src_clearing, platform, amounts.platform),
    ]
    return [(asset, credit, debit, amount) if reverse else (asset, debit, credit, amount)
            for asset, debit, credit, amount in legs if amount > 0]  # fmt: skip


def events_of(record: ConversionRecord) -> list[outbox.StagedEvent]:
    """What a completed conversion announces: out to its source, in to its destination."""
    source, seq = record.source_merchant_id, record.operation_seq
    return [
        outbox.StagedEvent(source, outbox.CONVERSION_OUT, source, conversion_seq=seq),
        outbox.StagedEvent(record.destination_merchant_id, outbox.CONVERSION_IN, source, conversion_seq=seq),
    ]


def row_of(record: ConversionRecord) -> dict[str, Any]:
    a = record.amounts
    return {
        "operation_seq": record.operation_seq,
        "source_merchant_id": record.source_merchant_id,
        "destination_merchant_id": record.destination_merchant_id,
        "src_member_ref": record.src_member_ref,
        "dst_member_ref": record.dst_member_ref,
        "currency": record.currency,
        "src_points": a.src_points,
        "dst_points": a.dst_points,
        "src_value_micros": a.src_value_micros,
        "dst_value_micros": a.dst_value_micros,
        "fee_bps": a.fee_bps,
        "src_cash_micros": a.src_cash,
        "fee_micros": a.fee,
        "dst_cash_micros": a.dst_cash,
        "residue_micros": a.residue,
        "quote_id": record.quote_id,
        "status": record.status,
        "reversal_operation_seq": record.reversal_operation_seq,
        "created_at_ms": record.created_at_ms,
    }


def _record(row: Any) -> ConversionRecord:
    return ConversionRecord(
        operation_seq=int(row["operation_seq"]),
        source_merchant_id=row["source_merchant_id"],
        destination_merchant_id=row["destination_merchant_id"],
        src_member_ref=row["src_member_ref"],
        dst_member_ref=row["dst_member_ref"],
        currency=row["currency"],
        amounts=ConversionAmounts(
            src_points=int(row["src_points"]),
            dst_points=int(row["dst_points"]),
            src_value_micros=int(row["src_value_micros"]),
            dst_value_micros=int(row["dst_value_micros"]),
            fee_bps=int(row["fee_bps"]),
            src_cash=int(row["src_cash_micros"]),
            fee=int(row["fee_micros"]),
            dst_cash=int(row["dst_cash_micros"]),
            residue=int(row["residue_micros"]),
        ),
        quote_id=row["quote_id"],
        status=row["status"],
        reversal_operation_seq=None if row["reversal_operation_seq"] is None else int(row["reversal_operation_seq"]),
        created_at_ms=int(row["created_at_ms"]),
    )


def get(conn: Connection, operation_seq: int, *, lock: bool = False) -> ConversionRecord:
    query = select(conversions).where(conversions.c.operation_seq == operation_seq)
    row = conn.execute(query.with_for_update() if lock else query).mappings().one_or_none()
    if row is None:
        conversion_id = format_operation_id(operation_seq)
        raise errors.ConversionNotFound(f"conversion {conversion_id} does not exist", conversion_id=conversion_id)
    return _record(row)


def get_many(conn: Connection, operation_seqs: list[int]) -> dict[int, ConversionRecord]:
    rows = conn.execute(select(conversions).where(conversions.c.operation_seq.in_(operation_seqs))).mappings()
    return {int(r["operation_seq"]): _record(r) for r in rows}


def reverse(
    conn: Connection, *, caller: str, request_id: str, operation_seq: int, now_ms: int, window_ms: int, memo: str = ""
) -> ConversionRecord:
    """The exact opposite postings as a new operation, while the member still holds the points."""
    # Locked first: a second reversal racing this one waits here and then sees it reversed.
    original = get(conn, operation_seq, lock=True)
    conversion_id = format_operation_id(operation_seq)
    if original.status != "completed":
        raise errors.AlreadyReversed(f"conversion {conversion_id} is already reversed", conversion_id=conversion_id)
    if now_ms > original.created_at_ms + window_ms:
        raise errors.ReversalWindowClosed(
            f"conversion {conversion_id} is older than the reversal window of {window_ms // 1000} s",
            conversion_id=conversion_id,
        )
    amounts = original.amounts
    _move_member_points(
        conn,
        (original.destination_merchant_id, original.dst_member_ref, amounts.dst_points),
        (original.source_merchant_id, original.src_member_ref, amounts.src_points),
    )
    stamped_ms = fences.stamp(conn, original.currency, now_ms)  # the open window, never a closed one
    # Money flows back: D's receivable and S's payable both shrink. No cap applies to undoing.
    _move_positions(
        conn, original.destination_merchant_id, amounts.dst_cash, original.source_merchant_id, amounts.src_cash
    )
    seq = accounts.record_operation(
        conn, kind="reversal", caller=caller, request_id=request_id, merchant_id=original.source_merchant_id,
        member_ref=original.src_member_ref, points=amounts.src_points,
        now_ms=stamped_ms,
        counterparty_merchant_id=original.destination_merchant_id, currency=original.currency,
        memo=(memo or f"reversal of {conversion_id}")[:200],
    )  # fmt: skip
    _post(conn, seq, original, reverse=True)
    reversed_ = conn.execute(
        update(conversions)
        .where(conversions.c.operation_seq == operation_seq, conversions.c.status == "completed")
        .values(status="reversed", reversal_operation_seq=seq)
    ).rowcount
    if reversed_ != 1:
        raise errors.AlreadyReversed(f"conversion {conversion_id} is already reversed", conversion_id=conversion_id)
    for merchant_id in (original.source_merchant_id, original.destination_merchant_id):
        outbox.emit(
            conn,
            outbox.StagedEvent(merchant_id, outbox.REVERSAL, original.source_merchant_id, conversion_seq=operation_seq),
        )
    return get(conn, operation_seq)
