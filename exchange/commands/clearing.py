"""Clearing's use cases: a merchant's statements (reading, acknowledging, disputing) and the
operator's cycles (closing, reading, marking settled).

Closing a cycle owns its transactions (clearing/close.py), so it runs beside the ledger writer
with its idempotency record in its own transaction; every other write goes through the writer.
The views a servicer encodes are named here too, so it needs nothing below this layer.
"""

from __future__ import annotations

from sqlalchemy import Connection

from clearing import actions, views
from clearing.close import Signing, close_cycle
from clearing.statement import StatementItem as StatementItem
from clearing.views import CycleView as CycleView
from clearing.views import DisputeView as DisputeView
from clearing.views import SignedStatement as SignedStatement
from clearing.views import StatementAcknowledgement as StatementAcknowledgement
from clearing.views import StatementSummary as StatementSummary
from exchange.domain.requests import MutationContext
from exchange.hub import Hub
from exchange.store import mutation


def signing(hub: Hub) -> Signing:
    """How this hub signs the statements of the cycles it closes."""
    return Signing(network=hub.config.network_name, hub_key=hub.hub_key, hub_key_id=hub.hub_key_id)


# A merchant's statements.


async def list_statements(
    hub: Hub, merchant_id: str, before_cutoff: int | None, size: int
) -> tuple[list[StatementSummary], bool]:
    """Up to `size` of the merchant's statements before a cutoff, newest first, and whether more follow."""
    found = await hub.query(lambda conn, _now: views.statement_summaries(conn, merchant_id, before_cutoff, size + 1))
    return found[:size], len(found) > size


async def get_statement(hub: Hub, merchant_id: str, cycle_id: str) -> SignedStatement:
    return await hub.query(lambda conn, _now: views.signed_statement(conn, merchant_id, cycle_id))


async def list_statement_items(
    hub: Hub, merchant_id: str, cycle_id: str, after_seq: int | None, size: int
) -> tuple[list[tuple[int, StatementItem]], bool]:
    """Up to `size` (operation seq, item) of one statement after `after_seq`, and whether more follow."""
    found = await hub.query(lambda conn, _now: views.statement_items(conn, merchant_id, cycle_id, after_seq, size + 1))
    return found[:size], len(found) > size


async def acknowledge_statement(
    hub: Hub, ctx: MutationContext, merchant_id: str, cycle_id: str, key_id: str, signature: bytes
) -> StatementAcknowledgement:
    """Store the merchant's signature over its statement; the acknowledgement that stands."""

    def effect(conn: Connection) -> StatementAcknowledgement:
        used_key, at_ms = actions.acknowledge(conn, merchant_id, cycle_id, key_id, signature, ctx.now_ms)
        return StatementAcknowledgement(cycle_id, merchant_id, used_key, at_ms)

    return await hub.mutate(ctx, effect)


async def dispute_item(
    hub: Hub, ctx: MutationContext, merchant_id: str, cycle_id: str, operation_seq: int, reason: str
) -> DisputeView:
    def effect(conn: Connection) -> DisputeView:
        return actions.dispute(conn, merchant_id, cycle_id, operation_seq, reason, ctx.now_ms)

    return await hub.mutate(ctx, effect)


# The operator's cycles.


async def close(hub: Hub, ctx: MutationContext, currency: str, cutoff_ms: int | None) -> CycleView:
    """Close the currency's cycle at the cutoff (None: now), or find it closed; the cycle as closed."""
    sign_with = signing(hub)

    def effect(conn: Connection) -> CycleView:
        cycle_id = close_cycle(
            conn, currency=currency, cutoff_ms=ctx.now_ms if cutoff_ms is None else cutoff_ms, now_ms=ctx.now_ms,
            signing=sign_with,
        )  # fmt: skip
        return views.cycle(conn, cycle_id)

    def run() -> CycleView:  # a close owns its transactions: beside the writer, not through it
        closed: CycleView = mutation.run_mutation(hub.engine, ctx, effect)
        return closed

    return await hub.maintain(run)


async def list_cycles(
    hub: Hub, currency: str | None, before: tuple[int, str] | None, size: int
) -> tuple[list[CycleView], bool]:
    """Up to `size` cycles (of one currency, or all) before (cutoff, id), newest first, and whether more follow."""

    def read(conn: Connection, _now: int) -> list[CycleView]:
        return [views.cycle(conn, c) for c in views.cycle_ids(conn, currency, before, size + 1)]

    found = await hub.query(read)
    return found[:size], len(found) > size


async def get_cycle(hub: Hub, cycle_id: str) -> CycleView:
    return await hub.query(lambda conn, _now: views.cycle(conn, cycle_id))


async def mark_settled(hub: Hub, ctx: MutationContext, cycle_id: str, bank_reference: str) -> CycleView:
    """Record the cycle's bank transfer and post its settlements; the cycle as settled."""

    def effect(conn: Connection) -> CycleView:
        actions.mark_settled(conn, caller=ctx.caller, request_id=ctx.request_id, cycle_id=cycle_id,
                             bank_reference=bank_reference, now_ms=ctx.now_ms)  # fmt: skip
        return views.cycle(conn, cycle_id)

    return await hub.mutate(ctx, effect)
