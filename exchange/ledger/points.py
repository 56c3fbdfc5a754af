"""Issue (earn) and redeem (spend): one guarded update of the member's balance plus one posting.

The member's debit is a single `UPDATE … WHERE points >= :n`: two concurrent redeems can never
both pass a check made in Python (STYLE, "debiting a member"). The merchant's issuance account
has no balance row to lock; its balance is derived from postings.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select, update

from exchange.domain.models import PointsMovement
from exchange.domain.refusals import insufficient, over_ceiling
from exchange.domain.units import MAX_BALANCE_POINTS
from exchange.ledger import accounts
from exchange.ledger import members as members_mod
from exchange.ledger import merchants as merchants_mod
from exchange.store.schema import members, merchants


def _issuance_account(conn: Connection, merchant_id: str) -> int:
    return int(
        conn.execute(select(merchants.c.issuance_account_id).where(merchants.c.merchant_id == merchant_id)).scalar_one()
    )


# Built once (hot path). One guarded statement each: the balance is checked where it is changed.
_MEMBER_ROW = (members.c.merchant_id == bindparam("m")) & (members.c.member_ref == bindparam("ref"))
_CREDIT = (
    update(members)
    .where(_MEMBER_ROW, members.c.points <= MAX_BALANCE_POINTS - bindparam("n"))
    .values(points=members.c.points + bindparam("n"))
    .returning(members.c.points)
)
_DEBIT = (
    update(members)
    .where(_MEMBER_ROW, members.c.points >= bindparam("n"))
    .values(points=members.c.points - bindparam("n"))
    .returning(members.c.points)
)


def credit_member(conn: Connection, merchant_id: str, member_ref: str, points: int) -> int:
    """Add points under the balance ceiling; returns the new balance."""
    new_balance = conn.execute(_CREDIT, {"m": merchant_id, "ref": member_ref, "n": points}).scalar_one_or_none()
    if new_balance is None:
        members_mod.require(conn, merchant_id, member_ref)
        raise over_ceiling(member_ref)
    return int(new_balance)


def debit_member(conn: Connection, merchant_id: str, member_ref: str, points: int) -> int:
    """Take points only if the balance covers them; returns the new balance."""
    new_balance = conn.execute(_DEBIT, {"m": merchant_id, "ref": member_ref, "n": points}).scalar_one_or_none()
    if new_balance is None:
        _account, _network, balance = members_mod.require(conn, merchant_id, member_ref)
        raise insufficient(member_ref, balance, points)
    return int(new_balance)


def issue(
    conn: Connection,
    *,
    caller: str,
    request_id: str,
    merchant_id: str,
    member_ref: str,
    points: int,
    memo: str,
    now_ms: int,
) -> PointsMovement:
    merchants_mod.require_active(conn, merchant_id)
    account_id, _network, _balance = members_mod.require(conn, merchant_id, member_ref)
    balance = credit_member(conn, merchant_id, member_ref, points)
    seq = accounts.record_operation(
        conn, kind="issue", caller=caller, request_id=request_id, merchant_id=merchant_id,
        member_ref=member_ref, points=points, memo=memo, now_ms=now_ms,
    )  # fmt: skip
    accounts.post(
        conn, seq, accounts.points_asset(merchant_id), _issuance_account(conn, merchant_id), account_id, points
    )
    return PointsMovement(seq, merchant_id, member_ref, points, balance, now_ms)


def redeem(
    conn: Connection,
    *,
    caller: str,
    request_id: str,
    merchant_id: str,
    member_ref: str,
    points: int,
    memo: str,
    now_ms: int,
) -> PointsMovement:
    merchants_mod.require_active(conn, merchant_id)
    account_id, _network, _balance = members_mod.require(conn, merchant_id, member_ref)
    balance = debit_member(conn, merchant_id, member_ref, points)
    seq = accounts.record_operation(
        conn, kind="redeem", caller=caller, request_id=request_id, merchant_id=merchant_id,
        member_ref=member_ref, points=points, memo=memo, now_ms=now_ms,
    )  # fmt: skip
    accounts.post(
        conn, seq, accounts.points_asset(merchant_id), account_id, _issuance_account(conn, merchant_id), points
    )
    return PointsMovement(seq, merchant_id, member_ref, points, balance, now_ms)
