"""Following a merchant's event stream with `async for`, resumed from the last cursor on its own.

The asyncio twin of `merchant_sdk.events.EventStream`, with the same cursor and reconnect policy
(`merchant_sdk._retry.StreamPosition`): after a disconnect it reopens the stream right after the
last event it delivered, so nothing is missed and nothing comes twice.
"""

from __future__ import annotations

import asyncio

import grpc

from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk._retry import STREAM_EVENTS, StreamPosition
from merchant_sdk.aio.transport import AsyncSignedTransport

__all__ = ["AsyncEventStream"]


class AsyncEventStream(StreamPosition):
    """`async for` it for events; `cursor` is where to resume; `close()` (or `async with`) stops it."""

    def __init__(
        self, transport: AsyncSignedTransport, merchant_id: str, cursor: str = "", *,
        reconnect: bool = True, heartbeats: bool = False, max_backoff_s: float = 5.0,
    ) -> None:  # fmt: skip
        super().__init__(merchant_id, cursor, reconnect=reconnect, heartbeats=heartbeats, max_backoff_s=max_backoff_s)
        self._transport = transport
        self._call: grpc.aio.UnaryStreamCall[bytes, bytes] | None = None
        self._closed = False

    def close(self) -> None:
        """Stop following: a pending `__anext__` ends the iteration. Call it from the stream's loop."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        """Cancel the current call (a no-op once it ended) and forget it: the next read reopens from the cursor."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncEventStream:
        return self

    @property
    def _done(self) -> bool:
        return self._closed or self._transport.closed  # closing the client ends its streams too

    async def __anext__(self) -> exchange_pb2.Event:
        while not self._done:
            raw = await self._read()
            if raw is not None:
                event = self.accept(raw)
                if event is not None:
                    return event
            elif not self._done:
                await asyncio.sleep(self.backoff_s())
        raise StopAsyncIteration

    async def _read(self) -> bytes | None:
        """The next message; None when the stream ended or broke (to be resumed, unless closed)."""
        if self._call is None:
            self._call = self._transport.open_stream(STREAM_EVENTS, self.request())
        try:
            raw = await self._call.read()
        except grpc.RpcError as exc:
            self._drop()
            error = None if self._done else self.fatal(exc)
            if error is not None:
                self._closed = True
                raise error from None
            return None
        except asyncio.CancelledError:
            self._drop()
            task = asyncio.current_task()
            if self._done and not (task is not None and task.cancelling()):
                return None  # close() cancelled the call under this read: the end of the stream
            raise  # the reading task itself is being cancelled (e.g. a wait_for timed out)
        if isinstance(raw, bytes):
            return raw
        # The hub never ends a stream on its own accord: it went away, so resume.
        self._drop()
        if not self._reconnect:
            self._closed = True
        return None
