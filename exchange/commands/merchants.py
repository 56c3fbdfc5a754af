"""A merchant's own affairs: its profile, point value schedule, signing keys and its side of routes."""

from __future__ import annotations

import functools

from sqlalchemy import Connection

from exchange.domain.models import KeyRecord, MerchantView, RouteView
from exchange.domain.requests import MutationContext
from exchange.hub import Hub
from exchange.ledger import keys, merchants, routes

# The two sides of a route a merchant agrees to (SetRoute's direction).
OUTBOUND, INBOUND = routes.OUTBOUND, routes.INBOUND


async def get(hub: Hub, viewer: str, merchant_id: str) -> MerchantView:
    """A merchant's profile; its private fields (cap, bank, keys) only for itself."""
    private = merchant_id == viewer
    return await hub.query(lambda conn, now: merchants.view(conn, merchant_id, now, private=private))


def _schedule_point_value(
    conn: Connection, *, merchant_id: str, value_micros: int, effective_at_ms: int, notice_ms: int, now_ms: int
) -> MerchantView:
    view = merchants.schedule_point_value(conn, merchant_id, value_micros, effective_at_ms, notice_ms, now_ms)
    routes.announce_value_change(conn, merchant_id, value_micros, effective_at_ms)
    return view


async def schedule_point_value(
    hub: Hub, ctx: MutationContext, merchant_id: str, value_micros: int, effective_at_ms: int
) -> MerchantView:
    """A new point value from `effective_at_ms` on (no sooner than the notice period), announced
    to the merchant's route partners."""
    effect = functools.partial(
        _schedule_point_value, merchant_id=merchant_id, value_micros=value_micros,
        effective_at_ms=effective_at_ms, notice_ms=hub.config.notice_period_s * 1000, now_ms=ctx.now_ms,
    )  # fmt: skip
    return await hub.mutate(ctx, effect)


async def add_key(hub: Hub, ctx: MutationContext, merchant_id: str, public_key: bytes) -> KeyRecord:
    """Another signing key for the merchant."""
    return await hub.mutate(
        ctx, functools.partial(keys.add, caller=merchant_id, public_key=public_key, now_ms=ctx.now_ms)
    )


async def revoke_key(hub: Hub, ctx: MutationContext, merchant_id: str, key_id: str) -> KeyRecord:
    """Revoke one of the merchant's keys; this process reads the key afresh on its next use."""
    try:
        return await hub.mutate(
            ctx, functools.partial(keys.revoke, caller=merchant_id, key_id=key_id, now_ms=ctx.now_ms)
        )
    finally:  # committed (or not): forget the cached key either way
        hub.authenticator.forget(key_id)


async def set_route(
    hub: Hub, ctx: MutationContext, merchant_id: str, partner_id: str, direction: str, enabled: bool
) -> RouteView:
    """The merchant's own consent to a route with `partner_id`: OUTBOUND (it sends) or INBOUND (it receives)."""
    effect = functools.partial(
        routes.set_side, merchant_id=merchant_id, partner_id=partner_id, direction=direction, enabled=enabled,
        now_ms=ctx.now_ms, default_fee=hub.config.default_fee_bps,
    )  # fmt: skip
    return await hub.mutate(ctx, effect)


async def list_routes(
    hub: Hub, merchant_id: str, after: tuple[str, str] | None, size: int
) -> tuple[list[RouteView], bool]:
    """Up to `size` of the merchant's routes after the (source, destination) pair `after`; and
    whether there are more."""
    default_fee = hub.config.default_fee_bps
    found = await hub.query(lambda conn, _now: routes.list_for(conn, merchant_id, after, size + 1, default_fee))
    return found[:size], len(found) > size
