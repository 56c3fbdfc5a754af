"""Conversions: a quote, a conversion (one, or each item of a batch), reading one back.

Every conversion is decided by the one engine (exchange/domain/decider.py) on a snapshot the
store loads (exchange/ledger/conversion_store.py). A conversion's write names two ways to run:
together with the other conversions of the writer's batch — one snapshot, one decision pass and
one statement per table for all of them — and alone, as a batch of one that locks what it reads,
which the writer uses after a conflict. Both are the same engine.
"""

from __future__ import annotations

import functools
from typing import Any

from exchange.domain import errors
from exchange.domain.decider import ConvertOrder
from exchange.domain.models import ConversionRecord, QuoteView
from exchange.domain.requests import MutationContext
from exchange.domain.units import format_operation_id
from exchange.hub import Hub, Write
from exchange.ledger import conversion_store, conversions
from exchange.store import mutation

# A batch item: its context and order, or the refusal its validation at the edge produced.
BatchItem = tuple[MutationContext, ConvertOrder] | errors.DomainError


async def convert(hub: Hub, ctx: MutationContext, order: ConvertOrder) -> ConversionRecord:
    """One conversion: a batch of one through the writer, together with whatever else is queued."""
    (result,) = await _convert_each(hub, [(ctx, order)])
    return mutation.outcome(result)  # type: ignore[no-any-return]


async def _convert_each(hub: Hub, items: list[tuple[MutationContext, ConvertOrder]]) -> list[Any]:
    fee = hub.config.default_fee_bps
    writes: list[Write] = [
        (
            ctx,
            functools.partial(conversion_store.convert_alone, ctx=ctx, order=order, default_fee=fee),
            (conversion_store.CONVERT_TOGETHER, (order, fee)),
        )
        for ctx, order in items
    ]
    return await hub.mutate_all(writes)


async def convert_each(hub: Hub, items: list[BatchItem]) -> list[Any]:
    """Each item's conversion record or refusal, in order; each with its own idempotency record."""
    runnable = [item for item in items if not isinstance(item, errors.DomainError)]
    results = iter(await _convert_each(hub, runnable))
    return [item if isinstance(item, errors.DomainError) else next(results) for item in items]


async def quote(hub: Hub, ctx: MutationContext, order: ConvertOrder, dst_points: int | None) -> QuoteView:
    """A quote at the values in force now, from `order.src_points` or a wanted `dst_points`."""
    config = hub.config
    effect = functools.partial(
        conversion_store.quote, order=order, dst_points=dst_points, now_ms=ctx.now_ms,
        ttl_ms=config.quote_ttl_s * 1000, default_fee=config.default_fee_bps,
    )  # fmt: skip
    return await hub.mutate(ctx, effect)


async def get(hub: Hub, viewer: str, operation_seq: int) -> ConversionRecord:
    """A conversion its source or destination merchant may read."""
    record = await hub.query(lambda conn, _now: conversions.get(conn, operation_seq))
    if viewer not in (record.source_merchant_id, record.destination_merchant_id):
        conversion_id = format_operation_id(operation_seq)
        raise errors.CrossMerchantAccess(f"conversion {conversion_id} is not one of {viewer}'s")
    return record
