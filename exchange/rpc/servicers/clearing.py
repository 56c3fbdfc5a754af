"""ClearingService (a merchant's statements) and the operator's cycle methods' translations."""

from __future__ import annotations

from exchange.commands import clearing as cycles
from exchange.domain import errors, units
from exchange.rpc import translate
from exchange.rpc.dispatch import Call, reply
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, operator_pb2

MAX_REASON = 500

_DISPUTE_STATUS = {"open": clearing_pb2.DISPUTE_STATUS_OPEN, "resolved": clearing_pb2.DISPUTE_STATUS_RESOLVED}
_CYCLE_STATUS = {"closed": operator_pb2.CYCLE_STATUS_CLOSED, "settled": operator_pb2.CYCLE_STATUS_SETTLED}


def dispute_message(view: cycles.DisputeView) -> clearing_pb2.Dispute:
    return clearing_pb2.Dispute(
        dispute_id=view.dispute_id,
        cycle_id=view.cycle_id,
        merchant_id=view.merchant_id,
        operation_id=units.format_operation_id(view.operation_seq),
        reason=view.reason,
        status=_DISPUTE_STATUS[view.status],
        created_at=translate.ts(view.created_at_ms),
    )


def cycle_message(view: cycles.CycleView) -> operator_pb2.Cycle:
    out = operator_pb2.Cycle(
        cycle_id=view.cycle_id,
        currency=view.currency,
        period_start=translate.ts(view.period_start_ms),
        cutoff=translate.ts(view.cutoff_ms),
        status=_CYCLE_STATUS[view.status],
        operation_count=view.operation_count,
        bank_reference=view.bank_reference,
        minor_units=view.minor_units,
        positions=[
            operator_pb2.CyclePosition(
                merchant_id=p.position.merchant_id,
                opening_carry_micros=p.position.opening_carry,
                payable_micros=p.position.payable,
                receivable_micros=p.position.receivable,
                fees_micros=p.position.fees,
                net_micros=p.position.net,
                settlement_minor=p.position.settlement_minor,
                closing_carry_micros=p.position.closing_carry,
                acknowledged=p.acknowledged,
                open_disputes=p.open_disputes,
            )
            for p in view.positions
        ],
        counterparties=[
            operator_pb2.CounterpartyPosition(
                merchant_id=m, counterparty_id=cp, payable_micros=pay, receivable_micros=recv
            )
            for m, cp, pay, recv in view.counterparties
        ],
        disputes=[dispute_message(d) for d in view.disputes],
    )
    if view.settled_at_ms is not None:
        out.settled_at.CopyFrom(translate.ts(view.settled_at_ms))
    return out


def _cycle_id(text: str) -> str:
    return units.check_text(text, "cycle_id", max_len=64, required=True)


def _acknowledgement(ack: cycles.StatementAcknowledgement) -> clearing_pb2.StatementAcknowledgement:
    return clearing_pb2.StatementAcknowledgement(
        cycle_id=ack.cycle_id,
        merchant_id=ack.merchant_id,
        key_id=ack.key_id,
        acknowledged_at=translate.ts(ack.acknowledged_at_ms),
    )


class ClearingServicer:
    async def ListStatements(
        self, request: clearing_pb2.ListStatementsRequest, call: Call
    ) -> clearing_pb2.ListStatementsResponse:
        merchant_id = call.own_merchant(request.merchant_id)
        size = translate.page_size(request.page_size)
        before = translate.decode_int_token(request.page_token)
        page, more = await cycles.list_statements(call.hub, merchant_id, before, size)
        return clearing_pb2.ListStatementsResponse(
            statements=[
                clearing_pb2.StatementSummary(
                    cycle_id=s.cycle_id,
                    currency=s.currency,
                    cutoff=translate.ts(s.cutoff_ms),
                    net=common_pb2.Cash(currency=s.currency, micros=s.net_micros),
                    settlement_minor=s.settlement_minor,
                    acknowledged=s.acknowledged,
                    open_disputes=s.open_disputes,
                )
                for s in page
            ],
            next_page_token=translate.encode_token(str(page[-1].cutoff_ms)) if more else "",
        )

    async def GetStatement(
        self, request: clearing_pb2.GetStatementRequest, call: Call
    ) -> clearing_pb2.StatementEnvelope:
        merchant_id = call.own_merchant(request.merchant_id)
        cycle_id = _cycle_id(request.cycle_id)
        signed = await cycles.get_statement(call.hub, merchant_id, cycle_id)
        return clearing_pb2.StatementEnvelope(
            statement_json=signed.statement_json, signature=signed.signature, key_id=signed.key_id
        )

    async def ListStatementItems(
        self, request: clearing_pb2.ListStatementItemsRequest, call: Call
    ) -> clearing_pb2.ListStatementItemsResponse:
        merchant_id = call.own_merchant(request.merchant_id)
        cycle_id = _cycle_id(request.cycle_id)
        size = translate.page_size(request.page_size)
        after = translate.decode_int_token(request.page_token)
        page, more = await cycles.list_statement_items(call.hub, merchant_id, cycle_id, after, size)
        return clearing_pb2.ListStatementItemsResponse(
            items=[
                clearing_pb2.StatementItem(
                    operation_id=i.operation_id,
                    direction=i.direction,
                    counterparty=i.counterparty,
                    points=i.points,
                    cash_micros=i.cash_micros,
                )
                for _seq, i in page
            ],
            next_page_token=translate.encode_token(str(page[-1][0])) if more else "",
        )

    async def AcknowledgeStatement(self, request: clearing_pb2.AcknowledgeStatementRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        cycle_id = _cycle_id(request.cycle_id)
        key_id = request.key_id
        signature = bytes(request.signature)
        if len(signature) != 64:
            raise errors.BadStatementSignature("an Ed25519 signature is 64 bytes", cycle_id=cycle_id)
        ack = await call.mutate(
            request.request_id, cycles.acknowledge_statement, merchant_id, cycle_id, key_id, signature
        )
        return reply(ack, _acknowledgement)

    async def DisputeItem(self, request: clearing_pb2.DisputeItemRequest, call: Call) -> bytes:
        merchant_id = call.own_merchant(request.merchant_id)
        cycle_id = _cycle_id(request.cycle_id)
        seq = units.parse_operation_id(request.operation_id)
        reason = units.check_text(request.reason, "reason", max_len=MAX_REASON, required=True)
        dispute = await call.mutate(request.request_id, cycles.dispute_item, merchant_id, cycle_id, seq, reason)
        return reply(dispute, dispute_message)


class CycleMethods:
    """The operator's side of clearing, mixed into OperatorServicer."""

    async def CloseCycle(self, request: operator_pb2.CloseCycleRequest, call: Call) -> bytes:
        currency = units.check_currency(request.currency, call.hub.accepted_currencies)
        cutoff = translate.ms_of(request.cutoff, "cutoff") if request.HasField("cutoff") else None
        cycle = await call.mutate(request.request_id, cycles.close, currency, cutoff)
        return reply(cycle, cycle_message)

    async def ListCycles(self, request: operator_pb2.ListCyclesRequest, call: Call) -> operator_pb2.ListCyclesResponse:
        currency = request.currency and units.check_currency(request.currency, call.hub.accepted_currencies)
        size = translate.page_size(request.page_size)
        before: tuple[int, str] | None = None
        if request.page_token:
            cutoff_text, _, cycle_id = translate.decode_token(request.page_token).partition(" ")
            if not cutoff_text.isdigit() or not cycle_id:
                raise errors.InvalidPageToken("page_token is not one this hub issued")
            before = (int(cutoff_text), cycle_id)
        page, more = await cycles.list_cycles(call.hub, currency or None, before, size)
        token = ""
        if more:
            token = translate.encode_token(f"{page[-1].cutoff_ms} {page[-1].cycle_id}")
        return operator_pb2.ListCyclesResponse(cycles=[cycle_message(c) for c in page], next_page_token=token)

    async def GetCycle(self, request: operator_pb2.GetCycleRequest, call: Call) -> operator_pb2.Cycle:
        cycle_id = _cycle_id(request.cycle_id)
        return cycle_message(await cycles.get_cycle(call.hub, cycle_id))

    async def MarkSettled(self, request: operator_pb2.MarkSettledRequest, call: Call) -> bytes:
        cycle_id = _cycle_id(request.cycle_id)
        reference = units.check_text(request.bank_reference, "bank_reference", max_len=140, required=True)
        cycle = await call.mutate(request.request_id, cycles.mark_settled, cycle_id, reference)
        return reply(cycle, cycle_message)
