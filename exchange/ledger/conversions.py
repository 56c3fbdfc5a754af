"""Converting a member's points from merchant S to merchant D, and reversing a conversion.

DESIGN §1 gives the amounts, §2 the postings, §3 and §4 who may convert and within which limits.
Everything a conversion touches commits in one transaction; each refusal raises before anything
durable happens (the mutation's savepoint rolls back any partial work). Locks are taken in one
order everywhere — member rows by merchant id, then position rows by merchant id, then the
clearing fence (exchange/store/fences.py) — so two conversions in opposite directions for one
person cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, func, insert, select, update

from exchange.domain import errors
from exchange.domain.conversion import ConversionAmounts, amounts_for_destination, convert_amounts
from exchange.domain.models import ConversionRecord, QuoteView, RouteView
from exchange.domain.units import format_operation_id
from exchange.ledger import accounts, members, merchants, points, positions, quotes, routes
from exchange.store import fences, outbox
from exchange.store.schema import conversions
from exchange.store.schema import members as members_table
from exchange.store.schema import merchants as merchants_table

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Pair:
    """A source member and its linked account at the destination, on an open route."""

    route: RouteView
    src_member_ref: str
    dst_member_ref: str

    @property
    def currency(self) -> str:
        return self.route.currency


@dataclass(frozen=True)
class ConvertOrder:
    source: str
    destination: str
    member_ref: str
    src_points: int  # 0 with a quote: take the quoted amount
    quote_id: str | None
    min_dst_points: int  # 0: no guard


def check_merchants(source: str, destination: str, source_currency: str, destination_currency: str) -> None:
    if source_currency != destination_currency:
        raise errors.CurrencyMismatch(
            f"{source} settles in {source_currency} and {destination} in {destination_currency}",
            source_currency=source_currency,
            destination_currency=destination_currency,
        )


def check_distinct(source: str, destination: str) -> None:
    if source == destination:
        raise errors.SameMerchant("a conversion runs between two different merchants", merchant_id=source)


def not_linked(member_ref: str, source: str, destination: str) -> errors.NotLinked:
    return errors.NotLinked(
        f"member {member_ref} of {source} has no linked account at {destination}",
        member_ref=member_ref,
        destination_merchant_id=destination,
    )


def check_pair(conn: Connection, source: str, destination: str, member_ref: str, default_fee: int) -> Pair:
    """Both merchants active in one currency, the route open, the member linked at D."""
    check_distinct(source, destination)
    source_currency = merchants.require_active(conn, source)
    destination_currency = merchants.require_active(conn, destination)
    check_merchants(source, destination, source_currency, destination_currency)
    route = routes.require_open(conn, source, destination, default_fee)
    _account, network_member_id, _points = members.require(conn, source, member_ref)
    dst_member_ref = conn.execute(
        members.LINKED_AT, {"network_member_id": network_member_id, "m": destination}
    ).scalar_one_or_none()
    if dst_member_ref is None:
        raise not_linked(member_ref, source, destination)
    return Pair(route, member_ref, str(dst_member_ref))


def check_route_limits(route: RouteView, src_points: int) -> None:
    if route.min_src_points and src_points < route.min_src_points:
        raise errors.AmountTooSmall(
            f"route {route.source_merchant_id} -> {route.destination_merchant_id} converts at least "
            f"{route.min_src_points} points",
            min_src_points=str(route.min_src_points),
        )
    if route.max_src_points and src_points > route.max_src_points:
        raise errors.AmountTooLarge(
            f"route {route.source_merchant_id} -> {route.destination_merchant_id} converts at most "
            f"{route.max_src_points} points",
            max_src_points=str(route.max_src_points),
        )


def live_amounts(
    conn: Connection, pair: Pair, now_ms: int, *, src_points: int | None = None, dst_points: int | None = None
) -> ConversionAmounts:
    """Amounts at the values in force now, from a source amount or a wanted destination amount."""
    src_value = merchants.value_at(conn, pair.route.source_merchant_id, now_ms).value_micros
    dst_value = merchants.value_at(conn, pair.route.destination_merchant_id, now_ms).value_micros
    if dst_points is not None:
        return amounts_for_destination(dst_points, src_value, dst_value, pair.route.fee_bps)
    assert src_points is not None
    return convert_amounts(src_points, src_value, dst_value, pair.route.fee_bps)


def quote(
    conn: Connection,
    *,
    source: str,
    destination: str,
    member_ref: str,
    src_points: int | None,
    dst_points: int | None,
    now_ms: int,
    ttl_ms: int,
    default_fee: int,
) -> QuoteView:
    pair = check_pair(conn, source, destination, member_ref, default_fee)
    amounts = live_amounts(conn, pair, now_ms, src_points=src_points, dst_points=dst_points)
    check_route_limits(pair.route, amounts.src_points)
    return quotes.create(
        conn,
        source=source,
        destination=destination,
        member_ref=member_ref,
        currency=pair.currency,
        amounts=amounts,
        now_ms=now_ms,
        ttl_ms=ttl_ms,
    )


def _check_daily_cap(conn: Connection, pair: Pair, src_cash: int, now_ms: int) -> None:
    cap = pair.route.daily_member_cap_micros
    if not cap:
        return
    used = conn.execute(
        select(func.coalesce(func.sum(conversions.c.src_cash_micros), 0)).where(
            conversions.c.source_merchant_id == pair.route.source_merchant_id,
            conversions.c.src_member_ref == pair.src_member_ref,
            conversions.c.destination_merchant_id == pair.route.destination_merchant_id,
            conversions.c.created_at_ms >= day_start(now_ms),
            conversions.c.status == "completed",
        )
    ).scalar_one()
    check_daily_cap_used(pair, int(used), src_cash)


def day_start(now_ms: int) -> int:
    """The start of the UTC calendar day a daily cap counts in."""
    return now_ms - now_ms % DAY_MS


def check_daily_cap_used(pair: Pair, used: int, src_cash: int) -> None:
    cap = pair.route.daily_member_cap_micros
    if cap and used + src_cash > cap:
        raise errors.DailyLimitExceeded(
            f"member {pair.src_member_ref} has converted {used} of {cap} micros today on this route; "
            f"{src_cash} more would pass the cap",
            member_ref=pair.src_member_ref,
            used_micros=str(used),
            cap_micros=str(cap),
        )


def _move_member_points(conn: Connection, debit: tuple[str, str, int], credit: tuple[str, str, int]) -> None:
    """Debit one member and credit another, taking the two row locks in merchant-id order."""
    if debit[0] <= credit[0]:
        points.debit_member(conn, *debit)
        points.credit_member(conn, *credit)
    else:
        points.credit_member(conn, *credit)
        points.debit_member(conn, *debit)


def _move_positions(
    conn: Connection, payer: str, payer_amount: int, payee: str, payee_amount: int, *, capped: bool
) -> None:
    """Payer's position down (under its cap when `capped`), payee's up, row locks in merchant-id order."""
    for merchant_id in sorted((payer, payee)):
        if merchant_id == payee:
            positions.add(conn, payee, payee_amount)
        elif capped:
            positions.take_payable(conn, payer, payer_amount)
        else:
            positions.add(conn, payer, -payer_amount)


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


def check_min_dst(order: ConvertOrder, amounts: ConversionAmounts) -> None:
    if order.min_dst_points and amounts.dst_points < order.min_dst_points:
        raise errors.MinDstPointsNotMet(
            f"{amounts.src_points} points yield {amounts.dst_points} at {order.destination} now, "
            f"fewer than the {order.min_dst_points} asked for",
            dst_points=str(amounts.dst_points),
            min_dst_points=str(order.min_dst_points),
        )


def convert(
    conn: Connection, *, caller: str, request_id: str, order: ConvertOrder, now_ms: int, default_fee: int
) -> ConversionRecord:
    pair = check_pair(conn, order.source, order.destination, order.member_ref, default_fee)
    if order.quote_id is not None:
        amounts = quotes.redeem(
            conn,
            quote_id=order.quote_id,
            source=order.source,
            destination=order.destination,
            member_ref=order.member_ref,
            src_points=order.src_points,
            now_ms=now_ms,
        )
    else:
        amounts = live_amounts(conn, pair, now_ms, src_points=order.src_points)
    check_min_dst(order, amounts)
    check_route_limits(pair.route, amounts.src_points)
    _move_member_points(
        conn,
        (order.source, pair.src_member_ref, amounts.src_points),
        (order.destination, pair.dst_member_ref, amounts.dst_points),
    )
    _check_daily_cap(conn, pair, amounts.src_cash, now_ms)  # after the member's row lock: one at a time
    _move_positions(conn, order.source, amounts.src_cash, order.destination, amounts.dst_cash, capped=True)
    stamped_ms = fences.stamp(conn, pair.currency, now_ms)  # the clearing window it lands in
    seq = accounts.record_operation(
        conn, kind="convert", caller=caller, request_id=request_id, merchant_id=order.source,
        member_ref=pair.src_member_ref, points=amounts.src_points, now_ms=stamped_ms,
        counterparty_merchant_id=order.destination, currency=pair.currency,
    )  # fmt: skip
    record = ConversionRecord(
        operation_seq=seq,
        source_merchant_id=order.source,
        destination_merchant_id=order.destination,
        src_member_ref=pair.src_member_ref,
        dst_member_ref=pair.dst_member_ref,
        currency=pair.currency,
        amounts=amounts,
        quote_id=order.quote_id,
        status="completed",
        reversal_operation_seq=None,
        created_at_ms=stamped_ms,
    )
    _post(conn, seq, record, reverse=False)
    conn.execute(_RECORD, row_of(record))
    if order.quote_id is not None:
        quotes.mark_used(conn, order.quote_id, seq)
    for event in events_of(record):
        outbox.emit(conn, event)
    return record


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
    # Money flows back: D's receivable and S's payable both shrink. No cap applies to undoing.
    _move_positions(
        conn, original.destination_merchant_id, amounts.dst_cash, original.source_merchant_id, amounts.src_cash,
        capped=False,
    )  # fmt: skip
    seq = accounts.record_operation(
        conn, kind="reversal", caller=caller, request_id=request_id, merchant_id=original.source_merchant_id,
        member_ref=original.src_member_ref, points=amounts.src_points,
        now_ms=fences.stamp(conn, original.currency, now_ms),  # lands in the open window, never a closed one
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
