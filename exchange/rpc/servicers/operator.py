"""OperatorService: admitting merchants, their status and caps, route terms and reversals."""

from __future__ import annotations

from exchange.commands import operator as commands
from exchange.domain import errors, units
from exchange.domain.models import BankDetails
from exchange.rpc import translate
from exchange.rpc.dispatch import Call, reply
from exchange.rpc.servicers.clearing import CycleMethods
from merchant_sdk._pb.pointsx.v1 import common_pb2, operator_pb2

_STATUS = {common_pb2.MERCHANT_STATUS_ACTIVE: "active", common_pb2.MERCHANT_STATUS_SUSPENDED: "suspended"}


def _reversal(done: commands.Reversal) -> operator_pb2.ReverseConversionResponse:
    return operator_pb2.ReverseConversionResponse(
        conversion_id=units.format_operation_id(done.conversion_seq),
        reversal_operation_id=units.format_operation_id(done.reversal_operation_seq),
        created_at=translate.ts(done.created_at_ms),
    )


class OperatorServicer(CycleMethods):
    async def RegisterMerchant(self, request: operator_pb2.RegisterMerchantRequest, call: Call) -> bytes:
        from exchange.domain.keys import raw_public_key

        raw_public_key(bytes(request.public_key))
        bank = request.bank
        admission = commands.MerchantAdmission(
            merchant_id=units.check_merchant_id(request.merchant_id),
            name=units.check_text(request.name, "name", max_len=200, required=True),
            currency=units.check_currency(request.currency, call.hub.accepted_currencies),
            point_value_micros=units.check_value_micros(request.point_value_micros),
            public_key=bytes(request.public_key),
            net_debit_cap_micros=units.check_cap_micros(request.net_debit_cap_micros),
            bank=commands.check_bank(BankDetails(bank.account_name, bank.iban, bank.bic, bank.bank_name, bank.country)),
        )
        merchant = await call.mutate(request.request_id, commands.register_merchant, admission)
        return reply(merchant, translate.merchant)

    async def SetMerchantStatus(self, request: operator_pb2.SetMerchantStatusRequest, call: Call) -> bytes:
        merchant_id = units.check_merchant_id(request.merchant_id)
        new_status = _STATUS.get(request.status)
        if new_status is None:
            raise errors.InvalidField("status must be ACTIVE or SUSPENDED", field="status")
        units.check_text(request.reason, "reason", max_len=500)
        merchant = await call.mutate(request.request_id, commands.set_merchant_status, merchant_id, new_status)
        return reply(merchant, translate.merchant)

    async def SetNetDebitCap(self, request: operator_pb2.SetNetDebitCapRequest, call: Call) -> bytes:
        merchant_id = units.check_merchant_id(request.merchant_id)
        cap = units.check_cap_micros(request.cap_micros)
        merchant = await call.mutate(request.request_id, commands.set_net_debit_cap, merchant_id, cap)
        return reply(merchant, translate.merchant)

    async def ListMerchants(
        self, request: operator_pb2.ListMerchantsRequest, call: Call
    ) -> operator_pb2.ListMerchantsResponse:
        size = translate.page_size(request.page_size)
        after = translate.decode_token(request.page_token) if request.page_token else ""
        page, more = await commands.list_merchants(call.hub, after, size)
        return operator_pb2.ListMerchantsResponse(
            merchants=[translate.merchant(v) for v in page],
            next_page_token=translate.encode_token(page[-1].merchant_id) if more else "",
        )

    async def SetRouteTerms(self, request: operator_pb2.SetRouteTermsRequest, call: Call) -> bytes:
        source = units.check_merchant_id(request.source_merchant_id)
        destination = units.check_merchant_id(request.destination_merchant_id)
        terms = commands.check_terms(
            commands.RouteTerms(
                fee_bps=request.fee_bps if request.HasField("fee_bps") else None,
                min_src_points=request.min_src_points,
                max_src_points=request.max_src_points,
                daily_member_cap_micros=request.daily_member_cap_micros,
                closed=request.closed,
            )
        )
        route = await call.mutate(request.request_id, commands.set_route_terms, source, destination, terms)
        return reply(route, translate.route)

    async def ReverseConversion(self, request: operator_pb2.ReverseConversionRequest, call: Call) -> bytes:
        seq = units.parse_operation_id(request.conversion_id)
        units.check_text(request.reason, "reason", max_len=500)
        done = await call.mutate(request.request_id, commands.reverse_conversion, seq, request.reason)
        return reply(done, _reversal)
