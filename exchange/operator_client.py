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
