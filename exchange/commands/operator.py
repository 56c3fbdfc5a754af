"""The operator's use cases: admitting merchants, their status and caps, route terms, reversals.

What the edge validates before a write is named here too (`MerchantAdmission`, `check_bank`,
`RouteTerms`, `check_terms`), so a servicer needs nothing below this layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from exchange.domain import outcomes
from exchange.domain.models import MerchantView, RouteView
from exchange.domain.requests import MutationContext
from exchange.hub import Hub
from exchange.ledger import conversions, merchants, routes
from exchange.ledger.merchants import MerchantAdmission as MerchantAdmission
from exchange.ledger.merchants import check_bank as check_bank
from exchange.ledger.routes import RouteTerms as RouteTerms
from exchange.ledger.routes import check_terms as check_terms


@outcomes.result
@dataclass(frozen=True)
class Reversal:
    """A reversed conversion: its operation, the reversal's, and when the reversal was asked for."""

    conversion_seq: int
    reversal_operation_seq: int
    created_at_ms: int


async def register_merchant(hub: Hub, ctx: MutationContext, admission: MerchantAdmission) -> MerchantView:
    """Admit a merchant (validated: `check_bank` and the units checks); its view."""

    def effect(conn: Connection) -> MerchantView:
        return merchants.register(conn, admission, ctx.now_ms)

    return await hub.mutate(ctx, effect)


async def set_merchant_status(hub: Hub, ctx: MutationContext, merchant_id: str, status: str) -> MerchantView:
    """Suspend or reactivate a merchant (`status`: "active" or "suspended"); its view."""

    def effect(conn: Connection) -> MerchantView:
        return merchants.set_status(conn, merchant_id, status, ctx.now_ms)

    return await hub.mutate(ctx, effect)


async def set_net_debit_cap(hub: Hub, ctx: MutationContext, merchant_id: str, cap_micros: int) -> MerchantView:
    def effect(conn: Connection) -> MerchantView:
        return merchants.set_net_debit_cap(conn, merchant_id, cap_micros, ctx.now_ms)

    return await hub.mutate(ctx, effect)


async def list_merchants(hub: Hub, after: str, size: int) -> tuple[list[MerchantView], bool]:
    """Up to `size` merchants after the id `after`, in id order, and whether more follow."""

    def read(conn: Connection, now_ms: int) -> tuple[list[MerchantView], bool]:
        ids = merchants.list_ids(conn, after, size + 1)
        return [merchants.view(conn, m, now_ms) for m in ids[:size]], len(ids) > size

    return await hub.query(read)


async def set_route_terms(
    hub: Hub, ctx: MutationContext, source: str, destination: str, terms: RouteTerms
) -> RouteView:
    """The operator's terms of a route (validated by `check_terms`); the route as it now stands."""
    default_fee = hub.config.default_fee_bps

    def effect(conn: Connection) -> RouteView:
        return routes.set_terms(conn, source, destination, terms, ctx.now_ms, default_fee)

    return await hub.mutate(ctx, effect)


async def reverse_conversion(hub: Hub, ctx: MutationContext, operation_seq: int, reason: str) -> Reversal:
    """Reverse a conversion within the reversal window."""
    window_ms = hub.config.reversal_window_s * 1000

    def effect(conn: Connection) -> Reversal:
        record = conversions.reverse(
            conn, caller=ctx.caller, request_id=ctx.request_id, operation_seq=operation_seq, now_ms=ctx.now_ms,
            window_ms=window_ms, memo=reason,
        )  # fmt: skip
        assert record.reversal_operation_seq is not None
        return Reversal(operation_seq, record.reversal_operation_seq, ctx.now_ms)

    return await hub.mutate(ctx, effect)
