"""ExchangeService: quotes, conversions (one or a batch), reading one back, and the event stream."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from exchange.commands import conversions, events
from exchange.domain import errors, outcomes, units
from exchange.domain import events as event_kinds
from exchange.domain.decider import ConvertOrder
from exchange.rpc import status, translate
from exchange.rpc.dispatch import Call, folds_nonce, reply
from merchant_sdk._pb.pointsx.v1 import common_pb2, exchange_pb2

CONVERT_METHOD = "/pointsx.v1.ExchangeService/Convert"
MAX_BATCH_ITEMS = 1000
EVENTS_PER_READ = 200

_EVENT_TYPE = {
    event_kinds.CONVERSION_IN: exchange_pb2.EVENT_TYPE_CONVERSION_IN,
    event_kinds.CONVERSION_OUT: exchange_pb2.EVENT_TYPE_CONVERSION_OUT,
    event_kinds.REVERSAL: exchange_pb2.EVENT_TYPE_REVERSAL,
    event_kinds.POINT_VALUE_CHANGED: exchange_pb2.EVENT_TYPE_POINT_VALUE_CHANGED,
    event_kinds.STATEMENT_READY: exchange_pb2.EVENT_TYPE_STATEMENT_READY,
}


def _check_quote_id(quote_id: str) -> str | None:
    if not quote_id:
        return None
    try:
        parsed = uuid.UUID(quote_id)
    except ValueError:
        raise errors.InvalidField("quote_id is not a quote this hub issued", field="quote_id") from None
    return str(parsed)


def _order(request: exchange_pb2.ConvertRequest, source: str) -> ConvertOrder:
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
    return ConvertOrder(
        source=source,
        destination=destination,
        member_ref=member_ref,
        src_points=request.src_points,
        quote_id=quote_id,
        min_dst_points=request.min_dst_points,
    )


def _conversion_for(viewer: str) -> Any:
    return lambda record: translate.conversion(record, viewer)


class ExchangeServicer:
    @folds_nonce
    async def QuoteConversion(self, request: exchange_pb2.QuoteConversionRequest, call: Call) -> bytes:
        source = call.own_merchant(request.merchant_id)
        member_ref = units.check_member_ref(request.member_ref)
        destination = units.check_merchant_id(request.destination_merchant_id)
        which = request.WhichOneof("amount")
        if which is None:
            raise errors.InvalidField("give src_points or dst_points", field="amount")
        src_points = units.check_points(request.src_points, "src_points") if which == "src_points" else 0
        dst_points = units.check_points(request.dst_points, "dst_points") if which == "dst_points" else None
        order = ConvertOrder(source, destination, member_ref, src_points, None, 0)
        quote = await call.mutate(request.request_id, conversions.quote, order, dst_points)
        return reply(quote, translate.quote)

    @folds_nonce
    async def Convert(self, request: exchange_pb2.ConvertRequest, call: Call) -> bytes:
        source = call.own_merchant(request.merchant_id)
        order = _order(request, source)
        record = await call.mutate(request.request_id, conversions.convert, order)
        return reply(record, _conversion_for(source))

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
        prepared: list[conversions.BatchItem] = []
        for item in request.items:
            try:
                item.request_id = item.request_id.lower()
                call.own_merchant(item.merchant_id)
                item.merchant_id = source  # the unary twin of this item names its merchant
                order = _order(item, source)
                prepared.append(
                    (call.mutation_context(item.request_id, now_ms, method=CONVERT_METHOD, content=item), order)
                )
            except errors.DomainError as refusal:
                prepared.append(refusal)
        answered = await conversions.convert_each(call.hub, prepared)
        response = exchange_pb2.ConvertBatchResponse()
        encode = _conversion_for(source)
        for index, outcome in enumerate(answered):
            result = response.results.add(index=index)
            if isinstance(outcome, errors.DomainError):
                _code, detail = status.for_error(outcome)
                result.error.CopyFrom(detail)
            elif isinstance(outcome, outcomes.LegacyReply):  # stored before results were: as stored
                result.conversion.ParseFromString(outcome.raw)
            else:
                result.conversion.CopyFrom(encode(outcome))
        return response

    async def GetConversion(self, request: exchange_pb2.GetConversionRequest, call: Call) -> exchange_pb2.Conversion:
        viewer = call.own_merchant(request.merchant_id)
        record = await conversions.get(call.hub, viewer, units.parse_operation_id(request.conversion_id))
        return translate.conversion(record, viewer)

    @staticmethod
    def _heartbeat(call: Call, merchant_id: str, position: tuple[int, int]) -> exchange_pb2.Event:
        return exchange_pb2.Event(
            cursor=event_kinds.format_cursor(*position),
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
            position = event_kinds.parse_cursor(request.cursor)
        else:
            position = await events.head(call.hub)
        config = call.hub.config
        loop = asyncio.get_running_loop()
        # A first heartbeat at once carries the stream's starting cursor: a client cut off before
        # anything happens resumes from here, not from a later "now".
        yield self._heartbeat(call, merchant_id, position)
        last_sent = loop.time()
        while True:
            batch = [
                _event(item, merchant_id)
                for item in await events.after(call.hub, merchant_id, position, EVENTS_PER_READ)
            ]
            for key, event in batch:
                yield event
                position, last_sent = key, loop.time()
            if len(batch) == EVENTS_PER_READ:
                continue
            if loop.time() - last_sent >= config.event_heartbeat_s:
                yield self._heartbeat(call, merchant_id, position)
                last_sent = loop.time()
            await asyncio.sleep(config.event_poll_s)


def _event(item: events.EventItem, viewer: str) -> tuple[tuple[int, int], exchange_pb2.Event]:
    stored = item.stored
    event = exchange_pb2.Event(
        cursor=stored.cursor,
        type=_EVENT_TYPE[stored.event.event_type],
        created_at=translate.ts(stored.created_at_ms),
        merchant_id=stored.event.subject_merchant_id,
    )
    if item.conversion is not None:
        completed_view = stored.event.event_type != event_kinds.REVERSAL
        event.conversion.CopyFrom(translate.conversion(item.conversion, viewer, as_of_completion=completed_view))
    elif stored.event.value_micros is not None and stored.event.effective_at_ms is not None:
        event.point_value.CopyFrom(
            common_pb2.PointValue(
                value_micros=stored.event.value_micros, effective_at=translate.ts(stored.event.effective_at_ms)
            )
        )
    elif stored.event.cycle_id is not None:
        event.cycle_id = stored.event.cycle_id
    return (stored.audit_seq, stored.idx), event
