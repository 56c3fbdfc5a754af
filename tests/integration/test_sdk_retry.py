"""The SDK's retries when a connection drops mid-call (DESIGN §2 "Idempotency").

A TCP proxy between the SDK and a real hub reads the HTTP/2 frames going each way and, when told,
cuts both connections once:

- `drop_next_response`: as the hub's answer to a call begins (its first HEADERS or DATA frame on a
  stream). A gRPC server sends those only after the handler has returned, so the operation is
  committed and the client never hears of it: the worst case of a lost answer.
- `drop_next_request`: as the call's HEADERS arrive, before the hub sees anything.

Either way the SDK sees UNAVAILABLE, sends the call again with the same request_id over a new
connection, and the operation is posted exactly once: after a lost answer the hub replays the
stored outcome (a spy on the mutation runner counts the replays), after a lost request it runs
the call for the first time.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from types import TracebackType

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from exchange.domain.errors import DomainError
from exchange.store import idempotency as idempotency_store
from exchange.store import mutation
from exchange.store.schema import idempotency
from merchant_sdk import MerchantClient, ledger_pb2
from tests.harness import RunningHub

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an HTTP/2 client sends before its first frame
_DATA, _HEADERS = 0x0, 0x1


def _frames(sock: socket.socket, *, client_side: bool) -> Iterator[tuple[int, int, bytes]]:
    """(frame type, stream id, raw bytes) of each HTTP/2 frame read from `sock`; the client's
    connection preface comes first, as type -1."""
    buffer = b""
    preface_due = client_side
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buffer += chunk
        if preface_due:
            if len(buffer) < len(_PREFACE):
                continue
            assert buffer.startswith(_PREFACE), "not an HTTP/2 client"
            yield -1, 0, _PREFACE
            buffer, preface_due = buffer[len(_PREFACE) :], False
        while len(buffer) >= 9:
            end = 9 + int.from_bytes(buffer[:3], "big")  # 9-byte header: 24-bit length, type, flags, stream
            if len(buffer) < end:
                break
            frame, buffer = buffer[:end], buffer[end:]
            yield frame[3], int.from_bytes(frame[5:9], "big") & 0x7FFF_FFFF, frame


class DroppingProxy:
    """Forwards 127.0.0.1:<port> to the hub, frame by frame, cutting a connection when told."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._cut_request = self._cut_response = False
        self._sockets: list[socket.socket] = []
        self.connections = self.requests = self.requests_cut = self.responses_cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next_request(self) -> None:
        with self._lock:
            self._cut_request = True

    def drop_next_response(self) -> None:
        with self._lock:
            self._cut_response = True

    def _accept(self) -> None:
        while True:
            try:
                client, _address = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            with self._lock:
                self.connections += 1
                self._sockets += [client, upstream]
            for direction in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=direction, daemon=True).start()

    def _cut_now(self, kind: int, stream: int, client_side: bool) -> bool:
        if kind not in (_HEADERS, _DATA) or stream == 0:
            return False
        with self._lock:
            if client_side and kind == _HEADERS:
                self.requests += 1
                if self._cut_request:
                    self._cut_request, self.requests_cut = False, self.requests_cut + 1
                    return True
            if not client_side and self._cut_response:
                self._cut_response, self.responses_cut = False, self.responses_cut + 1
                return True
        return False

    def _pump(self, source: socket.socket, sink: socket.socket, client_side: bool) -> None:
        """One direction of a connection; when it ends, or is cut, both directions end."""
        with contextlib.suppress(OSError):  # OSError: the other direction closed the pair
            for kind, stream, raw in _frames(source, client_side=client_side):
                if self._cut_now(kind, stream, client_side):
                    break
                sink.sendall(raw)
        _close(source)
        _close(sink)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock)

    def __enter__(self) -> DroppingProxy:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The request ids whose stored outcome the hub answered with (its mutation runner's replays)."""
    seen: list[str] = []
    original = mutation._replay

    def spy(stored: idempotency_store.StoredOutcome, ctx: mutation.MutationContext) -> bytes | DomainError:
        seen.append(ctx.request_id)
        return original(stored, ctx)

    monkeypatch.setattr(mutation, "_replay", spy)
    return seen


def _records(hub: RunningHub, caller: str, method: str) -> int:
    """Idempotency records of `caller` for `method`: one per request_id the hub was sent."""
    with hub.hub.engine.connect() as conn:
        query = select(func.count()).where(idempotency.c.caller == caller, idempotency.c.method == method)
        return int(conn.execute(query).scalar_one())


def test_issue_points_whose_answer_or_request_is_lost_posts_once(hub: RunningHub, replays: list[str]) -> None:
    brew, key = hub.admit("brew")
    brew.enroll_member("alice")
    with DroppingProxy(hub.port) as proxy, MerchantClient(proxy.target, "brew", key) as through:
        proxy.drop_next_response()
        lost_answer = through.issue_points("alice", 100, memo="the answer was lost")
        assert (proxy.responses_cut, proxy.requests, proxy.connections) == (1, 2, 2), "cut once, then asked again"
        assert len(replays) == 1, "the second attempt got the stored outcome of the first"

        proxy.drop_next_request()
        lost_request = through.issue_points("alice", 20, memo="the request was lost")
        assert (proxy.requests_cut, proxy.requests, proxy.connections) == (1, 4, 3)
        assert len(replays) == 1, "the hub never saw the first attempt: nothing to replay"

    assert (lost_answer.balance_points, lost_request.balance_points) == (100, 120)
    assert brew.get_balance("alice").points == 120
    activity = [(a.operation_id, a.kind, a.points_delta) for a in brew.iter_activity("alice")]
    assert activity == [
        (lost_request.operation_id, ledger_pb2.ACTIVITY_KIND_ISSUE, 20),
        (lost_answer.operation_id, ledger_pb2.ACTIVITY_KIND_ISSUE, 100),
    ]
    assert _records(hub, "brew", "/pointsx.v1.LedgerService/IssuePoints") == 2, "one request_id per call, reused"
    brew.close()


def _linked_pair(hub: RunningHub) -> tuple[MerchantClient, Ed25519PrivateKey, MerchantClient]:
    brew, key = hub.admit("brew", cap_micros=1_000_000_000)
    skyway, _ = hub.admit("skyway", value_micros=50_000)
    brew.enroll_member("alice")
    skyway.enroll_member("A-1001")
    skyway.redeem_link_code("A-1001", brew.create_link_code("alice").code)
    brew.issue_points("alice", 10_000)
    brew.set_route("skyway", "outbound")
    skyway.set_route("brew", "inbound")
    return brew, key, skyway


def test_conversions_whose_answers_are_lost_post_once(hub: RunningHub, replays: list[str]) -> None:
    brew, key, skyway = _linked_pair(hub)
    with DroppingProxy(hub.port) as proxy, MerchantClient(proxy.target, "brew", key) as through:
        proxy.drop_next_response()
        plain = through.convert("alice", "skyway", 500)  # values in force

        quote = through.quote_conversion("alice", "skyway", src_points=1_000)
        proxy.drop_next_response()
        quoted = through.convert("alice", "skyway", quote_id=quote.quote_id)  # the retry is not QUOTE_ALREADY_USED

        items = [through.conversion_request("alice", "skyway", points) for points in (100, 200)]
        proxy.drop_next_response()
        batch = through.convert_batch(items)
        assert proxy.responses_cut == 3 and proxy.requests == 7, "3 calls cut once each, a quote, 3 retries"

    assert len(replays) == 4, "the plain and quoted conversions and both batch items replayed"
    assert (plain.dst_points, quoted.dst_points) == (99, 198)  # 100 bps: 5.00 -> 4.95, 10.00 -> 9.90 CNY
    assert quoted.quote_id == quote.quote_id and quoted.dst_points == quote.dst_points
    batched = [result.conversion for result in batch.results]
    assert [c.src_points for c in batched] == [100, 200] and all(c.conversion_id for c in batched)

    conversions = [plain, quoted, *batched]
    assert brew.get_balance("alice").points == 10_000 - 1_800
    assert skyway.get_balance("A-1001").points == sum(c.dst_points for c in conversions)
    outbound = [a.operation_id for a in brew.iter_activity("alice") if a.kind == ledger_pb2.ACTIVITY_KIND_CONVERT_OUT]
    assert sorted(outbound) == sorted(c.conversion_id for c in conversions), "each conversion posted once"
    assert _records(hub, "brew", "/pointsx.v1.ExchangeService/Convert") == 4
    brew.close()
    skyway.close()
