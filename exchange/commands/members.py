"""Members at the caller's merchant: enrolment, issuing and redeeming points, balances, activity,
and linking one person's accounts at several merchants (DESIGN §3)."""

from __future__ import annotations

import functools

from sqlalchemy import Connection

from exchange.domain.models import ActivityRecord, LinkCodeIssued, MemberView, PointsMovement
from exchange.domain.requests import MutationContext
from exchange.hub import Hub
from exchange.ledger import linking, members, merchants, points


def check_link_code(code: str) -> str:
    """A link code as typed by a person, in its canonical form; LINK_CODE_INVALID if it cannot be one."""
    return linking.normalise(code)


def _enroll(conn: Connection, *, merchant_id: str, member_ref: str, now_ms: int) -> MemberView:
    merchants.require_active(conn, merchant_id)
    return members.enroll(conn, merchant_id, member_ref, now_ms)


async def enroll(hub: Hub, ctx: MutationContext, merchant_id: str, member_ref: str) -> MemberView:
    """Enrol a member at an active merchant; MEMBER_EXISTS if it is enrolled already."""
    effect = functools.partial(_enroll, merchant_id=merchant_id, member_ref=member_ref, now_ms=ctx.now_ms)
    return await hub.mutate(ctx, effect)


async def issue(
    hub: Hub, ctx: MutationContext, merchant_id: str, member_ref: str, amount: int, memo: str
) -> PointsMovement:
    """Credit a member with points the merchant issues (earned)."""
    effect = functools.partial(
        points.issue, caller=ctx.caller, request_id=ctx.request_id, merchant_id=merchant_id,
        member_ref=member_ref, points=amount, memo=memo, now_ms=ctx.now_ms,
    )  # fmt: skip
    return await hub.mutate(ctx, effect)


async def redeem(
    hub: Hub, ctx: MutationContext, merchant_id: str, member_ref: str, amount: int, memo: str
) -> PointsMovement:
    """Take points a member spends at the merchant, only if the balance covers them."""
    effect = functools.partial(
        points.redeem, caller=ctx.caller, request_id=ctx.request_id, merchant_id=merchant_id,
        member_ref=member_ref, points=amount, memo=memo, now_ms=ctx.now_ms,
    )  # fmt: skip
    return await hub.mutate(ctx, effect)


async def balance(hub: Hub, merchant_id: str, member_ref: str) -> MemberView:
    """A member's points and the merchants its account is linked to."""
    return await hub.query(lambda conn, _now: members.view(conn, merchant_id, member_ref))


async def activity(
    hub: Hub, merchant_id: str, member_ref: str | None, before_posting_id: int | None, size: int
) -> tuple[list[ActivityRecord], bool]:
    """Up to `size` postings of the merchant's members (or of one member), newest first, before
    `before_posting_id`; and whether there are more."""

    def read(conn: Connection, _now: int) -> list[ActivityRecord]:
        if member_ref is not None:
            members.require(conn, merchant_id, member_ref)
        return members.activity(conn, merchant_id, member_ref, before_posting_id, size + 1)

    records = await hub.query(read)
    return records[:size], len(records) > size


def _create_link_code(conn: Connection, *, merchant_id: str, member_ref: str, now_ms: int) -> LinkCodeIssued:
    merchants.require_active(conn, merchant_id)
    return linking.create_code(conn, merchant_id, member_ref, now_ms)


async def create_link_code(hub: Hub, ctx: MutationContext, merchant_id: str, member_ref: str) -> LinkCodeIssued:
    """A one-time code the member hands to another merchant to link its account there."""
    effect = functools.partial(_create_link_code, merchant_id=merchant_id, member_ref=member_ref, now_ms=ctx.now_ms)
    return await hub.mutate(ctx, effect)


def _redeem_link_code(conn: Connection, *, merchant_id: str, member_ref: str, code: str, now_ms: int) -> MemberView:
    merchants.require_active(conn, merchant_id)
    return linking.redeem_code(conn, merchant_id, member_ref, code, now_ms)


async def redeem_link_code(hub: Hub, ctx: MutationContext, merchant_id: str, member_ref: str, code: str) -> MemberView:
    """Link the merchant's member to the network member another merchant's code names."""
    effect = functools.partial(
        _redeem_link_code, merchant_id=merchant_id, member_ref=member_ref, code=code, now_ms=ctx.now_ms
    )
    return await hub.mutate(ctx, effect)


async def unlink(hub: Hub, ctx: MutationContext, merchant_id: str, member_ref: str) -> MemberView:
    """Detach the merchant's own account from the network member it is linked to."""
    return await hub.mutate(ctx, functools.partial(linking.unlink, merchant_id=merchant_id, member_ref=member_ref))
