"""OperatorService: admitting merchants and setting their status and caps."""

from __future__ import annotations

from exchange.domain import errors, units
from exchange.domain.models import BankDetails
from exchange.ledger import merchants
from exchange.rpc import translate
from exchange.rpc.dispatch import Call
from merchant_sdk._pb.pointsx.v1 import common_pb2, operator_pb2

_STATUS = {common_pb2.MERCHANT_STATUS_ACTIVE: "active", common_pb2.MERCHANT_STATUS_SUSPENDED: "suspended"}


class OperatorServicer:
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
