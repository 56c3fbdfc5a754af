"""The operator's signed client to a hub (used by `pointsx operator …` and the demo)."""

from __future__ import annotations

import uuid

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from merchant_sdk._pb.pointsx.v1 import common_pb2, operator_pb2
from merchant_sdk.signing import Signer
from merchant_sdk.transport import SignedTransport, TlsOptions

_OPERATOR = "/pointsx.v1.OperatorService/"


class OperatorClient:
    def __init__(
        self, target: str, private_key: Ed25519PrivateKey, *, tls: TlsOptions | None = None, timeout_s: float = 10.0
    ) -> None:
        self.signer = Signer("operator", private_key)
        self._transport = SignedTransport(target, self.signer, tls=tls, timeout_s=timeout_s)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_merchant(
        self,
        merchant_id: str,
        name: str,
        currency: str,
        point_value_micros: int,
        public_key: bytes,
        *,
        net_debit_cap_micros: int = 0,
        bank: common_pb2.BankDetails | None = None,
        request_id: str | None = None,
    ) -> common_pb2.Merchant:
        request = operator_pb2.RegisterMerchantRequest(
            request_id=request_id or str(uuid.uuid4()),
            merchant_id=merchant_id,
            name=name,
            currency=currency,
            point_value_micros=point_value_micros,
            public_key=public_key,
            net_debit_cap_micros=net_debit_cap_micros,
            bank=bank,
        )
        return self._transport.call(_OPERATOR + "RegisterMerchant", request, common_pb2.Merchant)

    def set_merchant_status(
        self, merchant_id: str, active: bool, *, reason: str = "", request_id: str | None = None
    ) -> common_pb2.Merchant:
        request = operator_pb2.SetMerchantStatusRequest(
            request_id=request_id or str(uuid.uuid4()),
            merchant_id=merchant_id,
            status=common_pb2.MERCHANT_STATUS_ACTIVE if active else common_pb2.MERCHANT_STATUS_SUSPENDED,
            reason=reason,
        )
        return self._transport.call(_OPERATOR + "SetMerchantStatus", request, common_pb2.Merchant)

    def set_net_debit_cap(
        self, merchant_id: str, cap_micros: int, *, request_id: str | None = None
    ) -> common_pb2.Merchant:
        request = operator_pb2.SetNetDebitCapRequest(
            request_id=request_id or str(uuid.uuid4()), merchant_id=merchant_id, cap_micros=cap_micros
        )
        return self._transport.call(_OPERATOR + "SetNetDebitCap", request, common_pb2.Merchant)

    def list_merchants(self, *, page_size: int = 100, page_token: str = "") -> operator_pb2.ListMerchantsResponse:
        request = operator_pb2.ListMerchantsRequest(page_size=page_size, page_token=page_token)
        return self._transport.call(_OPERATOR + "ListMerchants", request, operator_pb2.ListMerchantsResponse)

    def set_route_terms(
        self,
        source_merchant_id: str,
        destination_merchant_id: str,
        *,
        fee_bps: int | None = None,
        min_src_points: int = 0,
        max_src_points: int = 0,
        daily_member_cap_micros: int = 0,
        closed: bool = False,
        request_id: str | None = None,
    ) -> common_pb2.Route:
        """Set a route's fee (None: the network default), limits (0: none) and whether it is closed."""
        request = operator_pb2.SetRouteTermsRequest(
            request_id=request_id or str(uuid.uuid4()),
            source_merchant_id=source_merchant_id,
            destination_merchant_id=destination_merchant_id,
            min_src_points=min_src_points,
            max_src_points=max_src_points,
            daily_member_cap_micros=daily_member_cap_micros,
            closed=closed,
        )
        if fee_bps is not None:
            request.fee_bps = fee_bps
        return self._transport.call(_OPERATOR + "SetRouteTerms", request, common_pb2.Route)

    def reverse_conversion(
        self, conversion_id: str, *, reason: str = "", request_id: str | None = None
    ) -> operator_pb2.ReverseConversionResponse:
        request = operator_pb2.ReverseConversionRequest(
            request_id=request_id or str(uuid.uuid4()), conversion_id=conversion_id, reason=reason
        )
        return self._transport.call(_OPERATOR + "ReverseConversion", request, operator_pb2.ReverseConversionResponse)

    def close_cycle(
        self, currency: str, cutoff_ms: int | None = None, *, request_id: str | None = None, timeout_s: float = 600.0
    ) -> operator_pb2.Cycle:
        """Close (or find) the cycle of `currency` at `cutoff_ms` (default: now). Large cycles take a while."""
        request = operator_pb2.CloseCycleRequest(request_id=request_id or str(uuid.uuid4()), currency=currency)
        if cutoff_ms is not None:
            request.cutoff.FromMilliseconds(cutoff_ms)
        return self._transport.call(_OPERATOR + "CloseCycle", request, operator_pb2.Cycle, timeout_s=timeout_s)

    def list_cycles(
        self, currency: str = "", *, page_size: int = 50, page_token: str = ""
    ) -> operator_pb2.ListCyclesResponse:
        request = operator_pb2.ListCyclesRequest(currency=currency, page_size=page_size, page_token=page_token)
        return self._transport.call(_OPERATOR + "ListCycles", request, operator_pb2.ListCyclesResponse)

    def get_cycle(self, cycle_id: str) -> operator_pb2.Cycle:
        return self._transport.call(
            _OPERATOR + "GetCycle", operator_pb2.GetCycleRequest(cycle_id=cycle_id), operator_pb2.Cycle
        )

    def mark_settled(self, cycle_id: str, bank_reference: str, *, request_id: str | None = None) -> operator_pb2.Cycle:
        request = operator_pb2.MarkSettledRequest(
            request_id=request_id or str(uuid.uuid4()), cycle_id=cycle_id, bank_reference=bank_reference
        )
        return self._transport.call(_OPERATOR + "MarkSettled", request, operator_pb2.Cycle)
