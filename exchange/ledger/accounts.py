"""Accounts and postings (DESIGN §2): every balance change is a posting between two accounts of
one asset, so each asset's balances sum to zero by construction."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.exc import IntegrityError

from exchange.store.schema import accounts, operations, postings


def points_asset(merchant_id: str) -> str:
    return f"points:{merchant_id}"


def cash_asset(currency: str) -> str:
    return f"cash:{currency}"


# The network's own accounts (platform, settlement) of one asset: on every conversion.
_NETWORK_ACCOUNT = select(accounts.c.account_id).where(
    accounts.c.asset == bindparam("asset"),
    accounts.c.kind == bindparam("kind"),
    accounts.c.merchant_id.is_(None),
    accounts.c.member_ref.is_(None),
)


def get_or_create_account(
    conn: Connection, asset: str, kind: str, merchant_id: str | None = None, member_ref: str | None = None
) -> int:
    if merchant_id is None and member_ref is None:
        found = conn.execute(_NETWORK_ACCOUNT, {"asset": asset, "kind": kind}).scalar_one_or_none()
        if found is not None:
            return int(found)
    where = [accounts.c.asset == asset, accounts.c.kind == kind]
    where.append(accounts.c.merchant_id.is_(None) if merchant_id is None else accounts.c.merchant_id == merchant_id)
    where.append(accounts.c.member_ref.is_(None) if member_ref is None else accounts.c.member_ref == member_ref)
    found = conn.execute(select(accounts.c.account_id).where(*where)).scalar_one_or_none()
    if found is not None:
        return int(found)
    savepoint = conn.begin_nested()
    try:
        result = conn.execute(
            insert(accounts).values(asset=asset, kind=kind, merchant_id=merchant_id, member_ref=member_ref)
        )
    except IntegrityError:
        # A concurrent request created the same account first (e.g. two merchants of a new currency).
        savepoint.rollback()
        return int(conn.execute(select(accounts.c.account_id).where(*where)).scalar_one())
    savepoint.commit()
    return int(result.inserted_primary_key[0])  # type: ignore[index]


# Built once (hot path): statement building and cache keys cost more than the database's work.
_RECORD = insert(operations).returning(operations.c.operation_seq)
_POST = insert(postings)


def record_operation(
    conn: Connection,
    *,
    kind: str,
    caller: str,
    request_id: str,
    merchant_id: str,
    member_ref: str | None,
    points: int,
    now_ms: int,
    memo: str = "",
    counterparty_merchant_id: str | None = None,
    currency: str | None = None,
) -> int:
    return int(
        conn.execute(
            _RECORD,
            {
                "kind": kind,
                "caller": caller,
                "request_id": request_id,
                "merchant_id": merchant_id,
                "member_ref": member_ref,
                "points": points,
                "memo": memo,
                "counterparty_merchant_id": counterparty_merchant_id,
                "currency": currency,
                "created_at_ms": now_ms,
            },
        ).scalar_one()
    )


def post(
    conn: Connection, operation_seq: int, asset: str, debit_account_id: int, credit_account_id: int, amount: int
) -> None:
    """Move `amount` (> 0) of `asset` from the debit account to the credit account."""
    assert amount > 0, "a posting moves a positive amount"
    conn.execute(
        insert(postings).values(
            operation_seq=operation_seq,
            asset=asset,
            debit_account_id=debit_account_id,
            credit_account_id=credit_account_id,
            amount=amount,
        )
    )


def post_many(conn: Connection, operation_seq: int, legs: list[tuple[str, int, int, int]]) -> None:
    """Several postings of one operation, (asset, debit, credit, amount) each, in one statement."""
    assert all(amount > 0 for _asset, _debit, _credit, amount in legs), "a posting moves a positive amount"
    conn.execute(
        _POST,
        [
            {"operation_seq": operation_seq, "asset": asset, "debit_account_id": debit,
             "credit_account_id": credit, "amount": amount}
            for asset, debit, credit, amount in legs
        ],
    )  # fmt: skip
