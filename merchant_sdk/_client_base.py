"""What `MerchantClient` and `AsyncMerchantClient` share: who the merchant is and how it connects.

Both are made the same ways — a private key, a PEM key file, or the environment — with the same
TLS options, default deadline and retry budget; only the transport they send through differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Generic, Self, TypedDict, TypeVar, Unpack

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk._requests import MerchantRequests
from merchant_sdk._retry import DEFAULT_MAX_ATTEMPTS, DEFAULT_TIMEOUT_S
from merchant_sdk.signing import Signer, load_private_key_file
from merchant_sdk.transport import BaseTransport, TlsOptions

T = TypeVar("T", bound=BaseTransport)


class ConnectOptions(TypedDict, total=False):
    """The keyword options of a client's constructor, for `from_key_file` and `from_env`."""

    tls: TlsOptions | None
    timeout_s: float
    max_attempts: int


class ClientBase(Generic[T]):
    """One merchant's identity and connection; subclasses name their transport in `_transport_cls`."""

    _transport_cls: type[T]

    def __init__(
        self,
        target: str,
        merchant_id: str,
        private_key: Ed25519PrivateKey,
        *,
        tls: TlsOptions | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.merchant_id = merchant_id
        self.signer = Signer(merchant_id, private_key)
        self._rpc = MerchantRequests(self.signer)
        self._transport = self._transport_cls(
            target, self.signer, tls=tls, timeout_s=timeout_s, max_attempts=max_attempts
        )

    @classmethod
    def from_key_file(
        cls, target: str, merchant_id: str, key_file: str | Path, **options: Unpack[ConnectOptions]
    ) -> Self:
        """A client signing with the Ed25519 key in `key_file` (PKCS#8 PEM, as `pointsx keygen` writes)."""
        return cls(target, merchant_id, load_private_key_file(key_file), **options)

    @classmethod
    def from_env(cls, **options: Unpack[ConnectOptions]) -> Self:
        """POINTSX_TARGET, POINTSX_MERCHANT_ID, POINTSX_KEY_FILE (and POINTSX_CA_BUNDLE for TLS).

        So a merchant's app carries no hub address or key path in its code.
        """
        ca = os.environ.get("POINTSX_CA_BUNDLE")
        if ca and "tls" not in options:
            options["tls"] = TlsOptions(ca_bundle=Path(ca))
        return cls.from_key_file(
            os.environ.get("POINTSX_TARGET", "127.0.0.1:50051"),
            os.environ["POINTSX_MERCHANT_ID"],
            os.environ["POINTSX_KEY_FILE"],
            **options,
        )

    @property
    def key_id(self) -> str:
        """The id of the key this client signs with (DESIGN §6), as the hub lists it."""
        return self.signer.key_id

    def conversion_request(
        self,
        member_ref: str,
        destination_merchant_id: str,
        src_points: int = 0,
        *,
        quote_id: str = "",
        min_dst_points: int = 0,
        request_id: str | None = None,
    ) -> exchange_pb2.ConvertRequest:
        """One item for `convert_batch` (a request_id is made now, so the batch can be retried)."""
        return self._rpc.conversion(
            member_ref, destination_merchant_id, src_points, quote_id, min_dst_points, request_id
        )
