"""OperatorService: admitting merchants, their status and caps, route terms and reversals."""

from __future__ import annotations

from sqlalchemy import Connection

from exchange.domain import errors, units
from exchange.domain.models import BankDetails
from exchange.ledger import conversions, merchants, routes
from exchange.rpc import translate
from exchange.rpc.dispatch import Call
from exchange.rpc.servicers.clearing import CycleMethods
from merchant_sdk._pb.pointsx.v1 import common_pb2, operator_pb2

_STATUS = {common_pb2.MERCHANT_STATUS_ACTIVE: "active", common_pb2.MERCHANT_STATUS_SUSPENDED: "suspended"}


class OperatorServicer(CycleMethods):
    async def RegisterMerchant(self, request: operator_pb2.RegisterMerchantRequest, call: Call) -> bytes:
        from exchange.domain.keys import raw_public_key

        raw_public_key(bytes(request.public_key))
        bank = request.bank
        admission = merchants.MerchantAdmission(
            merchant_id=units.check_merchant_id(request.merchant_id),
            name=units.check_text(request.name, "name", max_len=200, required=True),
            currency=units.check_currency(request.currency, call.hub.accepted_currencies),
            point_value_micros=units.check_value_micros(request.point_value_micros),
            public_key=bytes(request.public_key),
            net_debit_cap_micros=units.check_cap_micros(request.net_debit_cap_micros),
            bank=merchants.check_bank(
                BankDetails(bank.account_name, bank.iban, bank.bic, bank.bank_name, bank.country)
            ),
        )
        return await call.mutate(
            request.request_id, lambda conn, now: translate.merchant(merchants.register(conn, admission, now))
        )

    async def SetMerchantStatus(self, request: operator_pb2.SetMerchantStatusRequest, call: Call) -> bytes:
        merchant_id = units.check_merchant_id(request.merchant_id)
        new_status = _STATUS.get(request.status)
        if new_status is None:
            raise errors.InvalidField("status must be ACTIVE or SUSPENDED", field="status")
        units.check_text(request.reason, "reason", max_len=500)
        return await call.mutate(
            request.request_id,
            lambda conn, now: translate.merchant(merchants.set_status(conn, merchant_id, new_status, now)),
        )

    async def SetNetDebitCap(self, request: operator_pb2.SetNetDebitCapRequest, call: Call) -> bytes:
        merchant_id = units.check_merchant_id(request.merchant_id)
        cap = units.check_cap_micros(request.cap_micros)
        return await call.mutate(
            request.request_id,
            lambda conn, now: translate.merchant(merchants.set_net_debit_cap(conn, merchant_id, cap, now)),
        )

    async def ListMerchants(
        self, request: operator_pb2.ListMerchantsRequest, call: Call
    ) -> operator_pb2.ListMerchantsResponse:
        size = translate.page_size(request.page_size)
        after = translate.decode_token(request.page_token) if request.page_token else ""

        def query(conn, now):  # type: ignore[no-untyped-def]
            ids = merchants.list_ids(conn, after, size + 1)
            return ids, [merchants.view(conn, m, now) for m in ids[:size]]

        ids, views = await call.read(query)
        return operator_pb2.ListMerchantsResponse(
            merchants=[translate.merchant(v) for v in views],
            next_page_token=translate.encode_token(ids[size - 1]) if len(ids) > size else "",
        )

    async def SetRouteTerms(self, request: operator_pb2.SetRouteTermsRequest, call: Call) -> bytes:
        source = units.check_merchant_id(request.source_merchant_id)
        destination = units.check_merchant_id(request.destination_merchant_id)
        terms = routes.check_terms(
            routes.RouteTerms(
                fee_bps=request.fee_bps if request.HasField("fee_bps") else None,
                min_src_points=request.min_src_points,
                max_src_points=request.max_src_points,
                daily_member_cap_micros=request.daily_member_cap_micros,
                closed=request.closed,
            )
        )
        default_fee = call.hub.config.default_fee_bps
        return await call.mutate(
            request.request_id,
            lambda conn, now: translate.route(routes.set_terms(conn, source, destination, terms, now, default_fee)),
        )

    async def ReverseConversion(self, request: operator_pb2.ReverseConversionRequest, call: Call) -> bytes:
        seq = units.parse_operation_id(request.conversion_id)
        units.check_text(request.reason, "reason", max_len=500)
        window_ms = call.hub.config.reversal_window_s * 1000

        def effect(conn: Connection, now: int) -> operator_pb2.ReverseConversionResponse:
            record = conversions.reverse(
                conn, caller=call.caller, request_id=call.request.request_id, operation_seq=seq, now_ms=now,
                window_ms=window_ms, memo=request.reason,
            )  # fmt: skip
            assert record.reversal_operation_seq is not None
            return operator_pb2.ReverseConversionResponse(
                conversion_id=units.format_operation_id(seq),
                reversal_operation_id=units.format_operation_id(record.reversal_operation_seq),
                created_at=translate.ts(now),
            )

        return await call.mutate(request.request_id, effect)
