"""Members: enrolment, balances and the activity a merchant sees of its own members."""

from __future__ import annotations

import uuid

from sqlalchemy import Connection, and_, bindparam, insert, literal, select, true, union_all
from sqlalchemy.exc import IntegrityError

from exchange.domain import errors
from exchange.domain.models import ActivityRecord, MemberView
from exchange.domain.refusals import not_enrolled
from exchange.ledger import accounts
from exchange.store.schema import members, operations, postings


def enroll(conn: Connection, merchant_id: str, member_ref: str, now_ms: int) -> MemberView:
    if conn.execute(
        select(members.c.member_ref).where(members.c.merchant_id == merchant_id, members.c.member_ref == member_ref)
    ).first():
        raise errors.MemberExists(f"member {member_ref} is already enrolled at {merchant_id}", member_ref=member_ref)
    account_id = accounts.get_or_create_account(
        conn, accounts.points_asset(merchant_id), "member", merchant_id, member_ref
    )
    savepoint = conn.begin_nested()
    try:
        conn.execute(
            insert(members).values(
                merchant_id=merchant_id,
                member_ref=member_ref,
                account_id=account_id,
                network_member_id=str(uuid.uuid4()),
                points=0,
                enrolled_at_ms=now_ms,
            )
        )
    except IntegrityError:
        # A concurrent enrolment of the same member_ref committed first.
        savepoint.rollback()
        raise errors.MemberExists(
            f"member {member_ref} is already enrolled at {merchant_id}", member_ref=member_ref
        ) from None
    savepoint.commit()
    return view(conn, merchant_id, member_ref)


# Built once (hot path): statement building and cache keys cost more than the database's work.
_MEMBER = select(members.c.account_id, members.c.network_member_id, members.c.points).where(
    members.c.merchant_id == bindparam("m"), members.c.member_ref == bindparam("ref")
)


def require(conn: Connection, merchant_id: str, member_ref: str) -> tuple[int, str, int]:
    """(account_id, network_member_id, points) of an enrolled member, or MEMBER_NOT_FOUND."""
    row = conn.execute(_MEMBER, {"m": merchant_id, "ref": member_ref}).one_or_none()
    if row is None:
        raise not_enrolled(merchant_id, member_ref)
    return int(row.account_id), str(row.network_member_id), int(row.points)


def linked_merchants(conn: Connection, network_member_id: str, except_merchant: str) -> list[str]:
    return list(
        conn.execute(
            select(members.c.merchant_id)
            .where(members.c.network_member_id == network_member_id, members.c.merchant_id != except_merchant)
            .order_by(members.c.merchant_id)
        ).scalars()
    )


def view(conn: Connection, merchant_id: str, member_ref: str) -> MemberView:
    row = conn.execute(
        select(members.c.network_member_id, members.c.points, members.c.enrolled_at_ms).where(
            members.c.merchant_id == merchant_id, members.c.member_ref == member_ref
        )
    ).one_or_none()
    if row is None:
        raise errors.MemberNotFound(f"member {member_ref} is not enrolled at {merchant_id}", member_ref=member_ref)
    return MemberView(
        merchant_id=merchant_id,
        member_ref=member_ref,
        points=int(row.points),
        linked_merchant_ids=linked_merchants(conn, row.network_member_id, merchant_id),
        enrolled_at_ms=int(row.enrolled_at_ms),
    )


_KIND_BY_OPERATION = {"issue": "issue", "redeem": "redeem", "reversal": "reversal"}


def activity(
    conn: Connection, merchant_id: str, member_ref: str | None, before_posting_id: int | None, limit: int
) -> list[ActivityRecord]:
    """Postings touching the merchant's member accounts, newest first (keyset pagination)."""
    member_filter = [members.c.merchant_id == merchant_id]
    if member_ref is not None:
        member_filter.append(members.c.member_ref == member_ref)
    legs = []
    for side, sign in ((postings.c.credit_account_id, 1), (postings.c.debit_account_id, -1)):
        legs.append(
            select(
                postings.c.posting_id,
                postings.c.operation_seq,
                postings.c.amount,
                literal(sign).label("sign"),
                members.c.member_ref,
            )
            .join(members, and_(members.c.account_id == side, *member_filter))
            .where(true() if before_posting_id is None else postings.c.posting_id < before_posting_id)
        )
    leg = union_all(*legs).subquery()
    rows = conn.execute(
        select(
            leg.c.posting_id,
            leg.c.operation_seq,
            (leg.c.amount * leg.c.sign).label("delta"),
            leg.c.member_ref,
            operations.c.kind,
            operations.c.merchant_id,
            operations.c.counterparty_merchant_id,
            operations.c.memo,
            operations.c.created_at_ms,
        )
        .join(operations, operations.c.operation_seq == leg.c.operation_seq)
        .order_by(leg.c.posting_id.desc())
        .limit(limit)
    ).all()
    out = []
    for row in rows:
        kind = _KIND_BY_OPERATION.get(row.kind) or ("convert_out" if row.delta < 0 else "convert_in")
        counterparty = row.counterparty_merchant_id or ""
        if kind == "convert_in" or (kind == "reversal" and counterparty == merchant_id):
            counterparty = row.merchant_id  # the other merchant of the conversion, seen from this one
        out.append(
            ActivityRecord(
                posting_id=int(row.posting_id),
                operation_seq=int(row.operation_seq),
                kind=kind,
                member_ref=row.member_ref,
                points_delta=int(row.delta),
                counterparty_merchant_id=counterparty,
                memo=row.memo,
                created_at_ms=int(row.created_at_ms),
            )
        )
    return out
