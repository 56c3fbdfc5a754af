"""A signed gRPC channel: serialises each request once, signs those exact bytes, sends them.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff and
jitter, a bounded number of times; each attempt is signed afresh (new timestamp and nonce) over
the same body, so the hub sees the same `request_id` and applies the operation once.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from merchant_sdk.errors import TransientError, from_rpc_error
from merchant_sdk.signing import Signer

M = TypeVar("M", bound=Message)
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 6  # with MAX_BACKOFF_S: rides out a hub restart of a few seconds
MAX_BACKOFF_S = 1.0


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


class SignedTransport:
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
        self.timeout_s = timeout_s
        self.max_attempts = max(1, min(max_attempts, 10))
        options = [
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            # Reconnect to a restarted hub within our retry budget, not after gRPC's default backoff
            # (1 s growing to 120 s); a channel of its own, not a subchannel shared (and backing off)
            # with every other client in the process.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.use_local_subchannel_pool", 1),
        ]
        self._channel = (
            grpc.secure_channel(target, tls.credentials(), options=options)
            if tls is not None
            else grpc.insecure_channel(target, options=options)
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
            metadata = tuple(self.signer.metadata(method, body)) if self.signer else ()
            try:
                raw = callable_(body, metadata=metadata, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if isinstance(error, TransientError) and attempt < self.max_attempts:
                    time.sleep(min(MAX_BACKOFF_S, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))
                    continue
                raise error from None
            return response_cls.FromString(raw)
        raise AssertionError("unreachable")

    def open_stream(
        self, method: str, request: Message, *, timeout_s: float | None = None
    ) -> grpc.Call:  # an iterator of response bytes that can be cancelled
        """Start a server stream, signed like a unary call; the caller iterates and cancels it."""
        body = request.SerializeToString()
        metadata = tuple(self.signer.metadata(method, body)) if self.signer else ()
        stream = self._channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        return stream(body, metadata=metadata, timeout=timeout_s)  # type: ignore[return-value]
