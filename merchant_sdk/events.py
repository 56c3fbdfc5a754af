"""Following a merchant's event stream, resumed from the last cursor after any disconnect.

The hub keeps every event in an outbox, so reconnecting with the cursor of the last event seen
delivers exactly the events after it: nothing missed, nothing twice. (The cursor and reconnect
policy live in `merchant_sdk._retry`, shared with the asyncio stream.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk._retry import STREAM_EVENTS, StreamPosition
from merchant_sdk.transport import SignedTransport

__all__ = ["STREAM_EVENTS", "EventStream"]


class EventStream(StreamPosition):
    """Iterate it for events; `cursor` is where to resume; `close()` stops it from any thread."""

    def __init__(
        self,
        transport: SignedTransport,
        merchant_id: str,
        cursor: str = "",
        *,
        reconnect: bool = True,
        heartbeats: bool = False,
        max_backoff_s: float = 5.0,
    ) -> None:
        super().__init__(merchant_id, cursor, reconnect=reconnect, heartbeats=heartbeats, max_backoff_s=max_backoff_s)
        self._transport = transport
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._call is not None:
                self._call.cancel()  # type: ignore[no-untyped-call]

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[exchange_pb2.Event]:
        while True:
            with self._lock:
                if self._closed:
                    return
                self._call = self._transport.open_stream(STREAM_EVENTS, self.request())
            try:
                for raw in self._call:  # type: ignore[attr-defined]
                    event = self.accept(raw)
                    if event is not None:
                        yield event
                # The hub never ends a stream on its own accord: it went away, so resume.
                if not self._reconnect:
                    return
            except grpc.RpcError as exc:
                if self._closed:
                    return
                error = self.fatal(exc)
                if error is not None:
                    raise error from None
            time.sleep(self.backoff_s())
