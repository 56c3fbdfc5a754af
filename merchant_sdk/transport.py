"""A signed gRPC channel: serialises each request once, signs those exact bytes, sends them.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff and
jitter, a bounded number of times (the policy in `merchant_sdk._retry`, shared with the asyncio
transport); each attempt is signed afresh (new timestamp and nonce) over the same body, so the hub
sees the same `request_id` and applies the operation once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from merchant_sdk._retry import (
    CHANNEL_OPTIONS,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT_S,
    MAX_BACKOFF_S,
    bounded_attempts,
    call_metadata,
    retry_delay_s,
)
from merchant_sdk.signing import Signer

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_TIMEOUT_S",
    "MAX_BACKOFF_S",
    "BaseTransport",
    "SignedTransport",
    "TlsOptions",
]

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class TlsOptions:
    """Server verification with a CA bundle; a client certificate when the hub asks for one."""

    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_bundle.read_bytes() if self.ca_bundle else None,
            private_key=self.client_key.read_bytes() if self.client_key else None,
            certificate_chain=self.client_cert.read_bytes() if self.client_cert else None,
        )


class BaseTransport(ABC):
    """What both transports hold: where the hub is, who signs, the TLS options, deadline and retry budget.

    `SignedTransport` (blocking) and `merchant_sdk.aio.AsyncSignedTransport` differ only in how they
    wait; a subclass sets its channel up in `_setup()`.
    """

    def __init__(
        self,
        target: str,
        signer: Signer | None,
        *,
        tls: TlsOptions | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.target = target
        self.signer = signer
        self.tls = tls
        self.timeout_s = timeout_s  # the default deadline of each call
        self.max_attempts = bounded_attempts(max_attempts)
        self._setup()

    @abstractmethod
    def _setup(self) -> None: ...


class SignedTransport(BaseTransport):
    """The blocking transport of `MerchantClient` (and of the hub's operator client)."""

    def _setup(self) -> None:
        self._channel = (
            grpc.secure_channel(self.target, self.tls.credentials(), options=CHANNEL_OPTIONS)
            if self.tls is not None
            else grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        )
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def close(self) -> None:
        self._channel.close()

    def call(self, method: str, request: Message, response_cls: type[M], *, timeout_s: float | None = None) -> M:
        body = request.SerializeToString()
        callable_ = self._calls.get(method)
        if callable_ is None:
            callable_ = self._calls[method] = self._channel.unary_unary(
                method, request_serializer=None, response_deserializer=None
            )
        for attempt in range(1, self.max_attempts + 1):
            metadata = call_metadata(self.signer, method, body)
            try:
                raw = callable_(body, metadata=metadata, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as exc:
                time.sleep(retry_delay_s(exc, attempt, self.max_attempts))  # raises when not worth a retry
                continue
            return response_cls.FromString(raw)
        raise AssertionError("unreachable")

    def open_stream(
        self, method: str, request: Message, *, timeout_s: float | None = None
    ) -> grpc.Call:  # an iterator of response bytes that can be cancelled
        """Start a server stream, signed like a unary call; the caller iterates and cancels it."""
        body = request.SerializeToString()
        metadata = call_metadata(self.signer, method, body)
        stream = self._channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        return stream(body, metadata=metadata, timeout=timeout_s)  # type: ignore[return-value]
