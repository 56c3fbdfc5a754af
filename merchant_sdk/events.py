"""Following a merchant's event stream, resumed from the last cursor after any disconnect.

The hub keeps every event in an outbox, so reconnecting with the cursor of the last event seen
delivers exactly the events after it: nothing missed, nothing twice.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import grpc

from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk.errors import TransientError, from_rpc_error
from merchant_sdk.transport import SignedTransport

STREAM_EVENTS = "/pointsx.v1.ExchangeService/StreamEvents"


class EventStream:
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
        self._transport = transport
        self._merchant_id = merchant_id
        self.cursor = cursor
        self._reconnect = reconnect
        self._heartbeats = heartbeats
        self._max_backoff_s = max_backoff_s
        self._lock = threading.Lock()
        self._call: grpc.Call | None = None
        self._closed = False
        self.reconnects = 0

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
        failures = 0
        while True:
            with self._lock:
                if self._closed:
                    return
                request = exchange_pb2.StreamEventsRequest(merchant_id=self._merchant_id, cursor=self.cursor)
                self._call = self._transport.open_stream(STREAM_EVENTS, request)
            try:
                for raw in self._call:  # type: ignore[attr-defined]
                    event = exchange_pb2.Event.FromString(raw)
                    failures = 0
                    if event.cursor:
                        self.cursor = event.cursor
                    if event.type != exchange_pb2.EVENT_TYPE_HEARTBEAT or self._heartbeats:
                        yield event
                # The hub never ends a stream on its own accord: it went away, so resume.
                if not self._reconnect:
                    return
            except grpc.RpcError as exc:
                if self._closed:
                    return
                error = from_rpc_error(exc)
                # A hub shutting down cancels its streams; like UNAVAILABLE, that is worth a reconnect.
                resumable = isinstance(error, TransientError) or error.code == grpc.StatusCode.CANCELLED
                if not (self._reconnect and resumable):
                    raise error from None
            failures += 1
            self.reconnects += 1
            time.sleep(random.uniform(0, min(self._max_backoff_s, 0.1 * 2**failures)))
