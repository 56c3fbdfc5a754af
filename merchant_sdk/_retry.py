"""Retry and reconnect policy, one for both transports (`transport` and `aio.transport`).

A call is retried only on UNAVAILABLE and DEADLINE_EXCEEDED, a bounded number of times, with
exponential backoff capped at MAX_BACKOFF_S and jitter (so clients cut off together do not come
back in step). Every attempt sends the same body — so the same `request_id` — under a fresh
signature, and the hub applies the operation once. An event stream that broke or ended is resumed
from the cursor of the last event it delivered.
"""

from __future__ import annotations

import random

import grpc

from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk.errors import PointsxError, TransientError, from_rpc_error
from merchant_sdk.signing import Signer

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 6  # with MAX_BACKOFF_S: rides out a hub restart of a few seconds
MAX_ATTEMPTS_LIMIT = 10
MAX_BACKOFF_S = 1.0
STREAM_EVENTS = "/pointsx.v1.ExchangeService/StreamEvents"

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # Reconnect to a restarted hub within our retry budget, not after gRPC's default backoff
    # (1 s growing to 120 s); a channel of its own, not a subchannel shared (and backing off)
    # with every other client in the process.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]

Metadata = tuple[tuple[str, str], ...]


def bounded_attempts(max_attempts: int) -> int:
    """At least one attempt, never more than MAX_ATTEMPTS_LIMIT, whatever the caller asked for."""
    return max(1, min(max_attempts, MAX_ATTEMPTS_LIMIT))


def call_metadata(signer: Signer | None, method: str, body: bytes) -> Metadata:
    """The auth metadata of one attempt: signed afresh each time (NetworkService needs none)."""
    return tuple(signer.metadata(method, body)) if signer else ()


def retry_delay_s(exc: grpc.RpcError, attempt: int, max_attempts: int) -> float:
    """Seconds to wait before retrying after failed attempt `attempt` (from 1).

    Raises the typed exception instead when the failure is not transient or the attempts are spent.
    """
    error = from_rpc_error(exc)
    if isinstance(error, TransientError) and attempt < max_attempts:
        return min(MAX_BACKOFF_S, 0.1 * 2.0**attempt) * random.uniform(0.5, 1.0)
    raise error from None


class StreamPosition:
    """Where a merchant's event stream has got to, and whether to go on after it broke.

    The state both EventStreams share: `cursor` (where to resume) and `reconnects` (how often it did).
    """

    def __init__(
        self, merchant_id: str, cursor: str, *, reconnect: bool, heartbeats: bool, max_backoff_s: float
    ) -> None:
        self.merchant_id = merchant_id
        self.cursor = cursor
        self.reconnects = 0
        self._reconnect = reconnect
        self._heartbeats = heartbeats
        self._max_backoff_s = max_backoff_s
        self._failures = 0

    def request(self) -> exchange_pb2.StreamEventsRequest:
        """Open (or reopen) the stream right after the last event seen: nothing missed, nothing twice."""
        return exchange_pb2.StreamEventsRequest(merchant_id=self.merchant_id, cursor=self.cursor)

    def accept(self, raw: bytes) -> exchange_pb2.Event | None:
        """Parse one event and move the cursor past it; None for a heartbeat nobody asked to see.

        A heartbeat's cursor is kept even so: a quiet stream from now still knows where to resume.
        """
        event = exchange_pb2.Event.FromString(raw)
        self._failures = 0
        if event.cursor:
            self.cursor = event.cursor
        if event.type == exchange_pb2.EVENT_TYPE_HEARTBEAT and not self._heartbeats:
            return None
        return event

    def fatal(self, exc: grpc.RpcError) -> PointsxError | None:
        """The typed exception to raise for a broken stream, or None when it is worth a reconnect."""
        error = from_rpc_error(exc)
        # A hub shutting down cancels its streams; like UNAVAILABLE, that is worth a reconnect.
        resumable = isinstance(error, TransientError) or error.code == grpc.StatusCode.CANCELLED
        return None if self._reconnect and resumable else error

    def backoff_s(self) -> float:
        """Count a reconnect and pick its delay: jittered, growing while reconnects keep failing."""
        self._failures += 1
        self.reconnects += 1
        return random.uniform(0, min(self._max_backoff_s, 0.1 * 2.0**self._failures))
