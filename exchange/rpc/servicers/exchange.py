"""ExchangeService: quotes, conversions (one or a batch), reading one back, and the event stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sqlalchemy import Connection

from exchange.domain import errors, units
from exchange.hub import Together
from exchange.ledger import conversion_batch, conversions
from exchange.rpc import status, translate
from exchange.rpc.dispatch import BatchItem, Call, folds_nonce
from exchange.store import mutation, outbox
from exchange.store.mutation import MutationContext
from merchant_sdk._pb.pointsx.v1 import common_pb2, exchange_pb2

CONVERT_METHOD = "/pointsx.v1.ExchangeService/Convert"
MAX_BATCH_ITEMS = 1000
EVENTS_PER_READ = 200

_EVENT_TYPE = {
    outbox.CONVERSION_IN: exchange_pb2.EVENT_TYPE_CONVERSION_IN,
    outbox.CONVERSION_OUT: exchange_pb2.EVENT_TYPE_CONVERSION_OUT,
    outbox.REVERSAL: exchange_pb2.EVENT_TYPE_REVERSAL,
    outbox.POINT_VALUE_CHANGED: exchange_pb2.EVENT_TYPE_POINT_VALUE_CHANGED,
    outbox.STATEMENT_READY: exchange_pb2.EVENT_TYPE_STATEMENT_READY,
}


def _check_quote_id(quote_id: str) -> str | None:
    if not quote_id:
        return None
    try:
        parsed = uuid.UUID(quote_id)
    except ValueError:
        raise errors.InvalidField("quote_id is not a quote this hub issued", field="quote_id") from None
    return str(parsed)


def _order(request: exchange_pb2.ConvertRequest, source: str) -> conversions.ConvertOrder:
    """Validate one conversion request before it reaches the ledger."""
    member_ref = units.check_member_ref(request.member_ref)
    destination = units.check_merchant_id(request.destination_merchant_id)
    quote_id = _check_quote_id(request.quote_id)
    if quote_id is None or request.src_points:
        units.check_points(request.src_points, "src_points")
    if not 0 <= request.min_dst_points <= units.MAX_POINTS:
        raise errors.InvalidAmount(
            f"min_dst_points must be between 0 (no guard) and {units.MAX_POINTS}", field="min_dst_points"
        )
    return conversions.ConvertOrder(
        source=source,
        destination=destination,
        member_ref=member_ref,
        src_points=request.src_points,
        quote_id=quote_id,
        min_dst_points=request.min_dst_points,
    )


def _convert_many(
    conn: Connection, items: list[tuple[MutationContext, tuple[conversions.ConvertOrder, int]]]
) -> list[mutation.Effected]:
    """Quote-less conversions of one writer batch, set-based (exchange/ledger/conversion_batch.py)."""
    default_fees = {fee for _ctx, (_order, fee) in items}
    if len(default_fees) != 1:
        raise AssertionError("one hub's writer sees one default fee")
    requests = [conversion_batch.Request(ctx.caller, ctx.request_id, order, ctx.now_ms) for ctx, (order, _) in items]
    effected: list[mutation.Effected] = []
    for outcome in conversion_batch.convert_many(conn, requests, default_fees.pop()):
        if isinstance(outcome, errors.DomainError):
            effected.append((outcome, []))
        else:
            response = translate.conversion(outcome, outcome.source_merchant_id).SerializeToString()
            effected.append((response, conversions.events_of(outcome)))
    return effected


_CONVERT_TOGETHER = mutation.together(_convert_many)  # one handler: the writer groups by it


def _together(call: Call, order: conversions.ConvertOrder) -> Together | None:
    """Quoted conversions run the single way: a quote is one row spent by one conversion."""
    return None if order.quote_id is not None else (_CONVERT_TOGETHER, (order, call.hub.config.default_fee_bps))


class ExchangeServicer:
    @folds_nonce
    async def QuoteConversion(self, request: exchange_pb2.QuoteConversionRequest, call: Call) -> bytes:
        source = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        destination = units.check_merchant_id(request.destination_merchant_id)
        which = request.WhichOneof("amount")
        if which is None:
            raise errors.InvalidField("give src_points or dst_points", field="amount")
        src_points = units.check_points(request.src_points, "src_points") if which == "src_points" else None
        dst_points = units.check_points(request.dst_points, "dst_points") if which == "dst_points" else None
        config = call.hub.config
        return await call.mutate(
            request.request_id,
            lambda conn, now: translate.quote(
                conversions.quote(
                    conn,
                    source=source,
                    destination=destination,
                    member_ref=member_ref,
                    src_points=src_points,
                    dst_points=dst_points,
                    now_ms=now,
                    ttl_ms=config.quote_ttl_s * 1000,
                    default_fee=config.default_fee_bps,
                )
            ),
        )

    def _effect(self, call: Call, order: conversions.ConvertOrder, request_id: str) -> Any:
        default_fee = call.hub.config.default_fee_bps

        def effect(conn: Connection, now: int) -> exchange_pb2.Conversion:
            record = conversions.convert(
                conn, caller=call.caller, request_id=request_id, order=order, now_ms=now, default_fee=default_fee
            )
            return translate.conversion(record, order.source)

        return effect

    @folds_nonce
    async def Convert(self, request: exchange_pb2.ConvertRequest, call: Call) -> bytes:
        source = call.own_merchant(request.merchant_id)
        order = _order(request, source)
        return await call.mutate(
            request.request_id, self._effect(call, order, request.request_id), _together(call, order)
        )

    async def ConvertBatch(
        self, request: exchange_pb2.ConvertBatchRequest, call: Call
    ) -> exchange_pb2.ConvertBatchResponse:
        source = call.own_merchant(request.merchant_id)
        if not request.items:
            raise errors.InvalidField("a batch holds at least one item", field="items")
        if len(request.items) > MAX_BATCH_ITEMS:
            raise errors.BatchTooLarge(
                f"a batch holds at most {MAX_BATCH_ITEMS} items, got {len(request.items)}",
                max_items=str(MAX_BATCH_ITEMS),
            )
        now_ms = call.hub.clock.now_ms()
        prepared: list[BatchItem] = []
        for item in request.items:
            try:
                item.request_id = item.request_id.lower()
                call.own_merchant(item.merchant_id)
                item.merchant_id = source  # the unary twin of this item names its merchant
                order = _order(item, source)
                ctx = call.mutation_context(item.request_id, now_ms, method=CONVERT_METHOD, content=item)
                prepared.append((ctx, self._effect(call, order, ctx.request_id), _together(call, order)))
            except errors.DomainError as refusal:
                prepared.append(refusal)
        outcomes = await call.mutate_each(prepared)
        response = exchange_pb2.ConvertBatchResponse()
        for index, outcome in enumerate(outcomes):
            result = response.results.add(index=index)
            if isinstance(outcome, bytes):
                result.conversion.ParseFromString(outcome)
            else:
                _code, detail = status.for_error(outcome)
                result.error.CopyFrom(detail)
        return response

    async def GetConversion(self, request: exchange_pb2.GetConversionRequest, call: Call) -> exchange_pb2.Conversion:
        viewer = call.own_merchant(request.merchant_id)
        seq = units.parse_operation_id(request.conversion_id)
        record = await call.read(lambda conn, now: conversions.get(conn, seq))
        if viewer not in (record.source_merchant_id, record.destination_merchant_id):
            raise errors.CrossMerchantAccess(f"conversion {request.conversion_id} is not one of {viewer}'s")
        return translate.conversion(record, viewer)

    @staticmethod
    def _heartbeat(call: Call, merchant_id: str, position: tuple[int, int]) -> exchange_pb2.Event:
        return exchange_pb2.Event(
            cursor=outbox.format_cursor(*position),
            type=exchange_pb2.EVENT_TYPE_HEARTBEAT,
            created_at=translate.ts(call.hub.clock.now_ms()),
            merchant_id=merchant_id,
        )

    async def StreamEvents(
        self, request: exchange_pb2.StreamEventsRequest, call: Call, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[exchange_pb2.Event]:
        """Polls the outbox from the cursor on; a heartbeat carries the cursor when nothing happens."""
        merchant_id = call.own_merchant(request.merchant_id)
        if request.cursor:
            position = outbox.parse_cursor(request.cursor)
        else:
            position = await call.read(lambda conn, now: outbox.head_position(conn))
        config = call.hub.config
        loop = asyncio.get_running_loop()
        # A first heartbeat at once carries the stream's starting cursor: a client cut off before
        # anything happens resumes from here, not from a later "now".
        yield self._heartbeat(call, merchant_id, position)
        last_sent = loop.time()
        while True:
            after = position
            batch = await call.read(lambda conn, now: _render(conn, merchant_id, after))  # noqa: B023
            for key, event in batch:
                yield event
                position, last_sent = key, loop.time()
            if len(batch) == EVENTS_PER_READ:
                continue
            if loop.time() - last_sent >= config.event_heartbeat_s:
                yield self._heartbeat(call, merchant_id, position)
                last_sent = loop.time()
            await asyncio.sleep(config.event_poll_s)


def _render(conn: Connection, merchant_id: str, after: tuple[int, int]) -> list[tuple[tuple[int, int], Any]]:
    stored = outbox.read_after(conn, merchant_id, after, EVENTS_PER_READ)
    seqs = [s.event.conversion_seq for s in stored if s.event.conversion_seq is not None]
    records = conversions.get_many(conn, seqs) if seqs else {}
    out = []
    for item in stored:
        event = exchange_pb2.Event(
            cursor=item.cursor,
            type=_EVENT_TYPE[item.event.event_type],
            created_at=translate.ts(item.created_at_ms),
            merchant_id=item.event.subject_merchant_id,
        )
        if item.event.conversion_seq is not None:
            record = records[item.event.conversion_seq]
            completed_view = item.event.event_type != outbox.REVERSAL
            event.conversion.CopyFrom(translate.conversion(record, merchant_id, as_of_completion=completed_view))
        elif item.event.value_micros is not None and item.event.effective_at_ms is not None:
            event.point_value.CopyFrom(
                common_pb2.PointValue(
                    value_micros=item.event.value_micros, effective_at=translate.ts(item.event.effective_at_ms)
                )
            )
        elif item.event.cycle_id is not None:
            event.cycle_id = item.event.cycle_id
        out.append(((item.audit_seq, item.idx), event))
    return out
