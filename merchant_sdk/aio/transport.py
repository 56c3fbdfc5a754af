"""The asyncio signed channel: `SignedTransport`'s twin on `grpc.aio`, with the same retry policy.

Each request is serialised once and those exact bytes are signed and sent; UNAVAILABLE and
DEADLINE_EXCEEDED are retried (bounded, with backoff and jitter: `merchant_sdk._retry`) over the
same body — so the same `request_id` — under a fresh signature, waiting with `asyncio.sleep`, so
the event loop keeps serving everything else meanwhile.

The channel is opened on first use, inside the running event loop, and belongs to that loop
(`grpc.aio` channels cannot move between loops): make and use a client within one loop, e.g. one
`asyncio.run`.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from merchant_sdk._retry import CHANNEL_OPTIONS, call_metadata, retry_delay_s
from merchant_sdk.transport import BaseTransport

__all__ = ["AsyncSignedTransport"]

M = TypeVar("M", bound=Message)


class AsyncSignedTransport(BaseTransport):
    """The asyncio transport of `AsyncMerchantClient`: awaitable calls, cancellable streams."""

    def _setup(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        self._closed = False

    def _open(self) -> grpc.aio.Channel:
        """The channel, opened now if this is the first call; refused from any loop but its own."""
        loop = asyncio.get_running_loop()
        if self._channel is None:
            self._channel = (
                grpc.aio.secure_channel(self.target, self.tls.credentials(), options=CHANNEL_OPTIONS)
                if self.tls is not None
                else grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            )
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this client's channel belongs to another event loop: make one client per loop")
        return self._channel

    @property
    def closed(self) -> bool:
        """Whether `close()` was called: event streams on this transport then end instead of reconnecting."""
        return self._closed

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight and ending event streams (nothing to do if never used)."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close(grace=None)

    async def call(self, method: str, request: Message, response_cls: type[M], *, timeout_s: float | None = None) -> M:
        """Send one unary call, retried while transient, within `timeout_s` (default: the transport's) per attempt."""
        body = request.SerializeToString()
        channel = self._open()
        if method not in self._calls:
            self._calls[method] = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        callable_ = self._calls[method]
        for attempt in range(1, self.max_attempts + 1):
            metadata = call_metadata(self.signer, method, body)
            try:
                raw = await callable_(body, metadata=metadata, timeout=timeout_s or self.timeout_s)
            except grpc.RpcError as exc:
                await asyncio.sleep(retry_delay_s(exc, attempt, self.max_attempts))  # raises when not worth a retry
                continue
            return response_cls.FromString(raw)
        raise AssertionError("unreachable")

    def open_stream(
        self, method: str, request: Message, *, timeout_s: float | None = None
    ) -> grpc.aio.UnaryStreamCall[bytes, bytes]:
        """Start a server stream, signed like a unary call; the caller reads it and cancels it."""
        body = request.SerializeToString()
        stream = self._open().unary_stream(method, request_serializer=None, response_deserializer=None)
        return stream(body, metadata=call_metadata(self.signer, method, body), timeout=timeout_s)
