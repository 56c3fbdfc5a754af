"""The event stream over real gRPC (DESIGN §2-§4; StreamEvents, exchange/store/outbox.py).

A conversion S -> D is announced to S (CONVERSION_OUT) and D (CONVERSION_IN), each seeing only its
own member's ref; a reversal to both; a point value change to the merchant and its route partners.
Refusals announce nothing. A stream from an empty cursor starts now; one from a cursor delivers
exactly what came after it, in commit order, once — across closes, reconnects and hub restarts.

Streams are consumed on background threads into queues (`Follower`), every wait is bounded, and
every stream is closed in a `finally`, so a broken hub fails a test instead of hanging it.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange import config as config_mod
from exchange.background import BackgroundHub
from exchange.rpc.servicers.exchange import EVENTS_PER_READ
from exchange.runtime import open_hub
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk.events import EventStream
from tests.auditor import check_invariants
from tests.harness import RunningHub

OUT = exchange_pb2.EVENT_TYPE_CONVERSION_OUT
IN = exchange_pb2.EVENT_TYPE_CONVERSION_IN
REVERSAL = exchange_pb2.EVENT_TYPE_REVERSAL
VALUE = exchange_pb2.EVENT_TYPE_POINT_VALUE_CHANGED
HEARTBEAT = exchange_pb2.EVENT_TYPE_HEARTBEAT
COMPLETED = exchange_pb2.CONVERSION_STATUS_COMPLETED
REVERSED = exchange_pb2.CONVERSION_STATUS_REVERSED

HEARTBEAT_S = 0.2
PAGE = EVENTS_PER_READ  # events the hub reads per poll
FAST_EVENTS: dict[str, object] = {"event_poll_s": 0.05, "event_heartbeat_s": HEARTBEAT_S}
WAIT_S = 10.0
CAP = 10**12

Item = exchange_pb2.Event | BaseException | None


class Follower:
    """An EventStream drained on its own thread; the test takes items with bounded waits."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self._items: queue.Queue[Item] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, name="event-follower", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        try:
            for event in self.stream:
                self._items.put(event)
        except BaseException as exc:  # handed to the test thread
            self._items.put(exc)
        else:
            self._items.put(None)

    def item(self, timeout: float = WAIT_S) -> exchange_pb2.Event:
        try:
            got = self._items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"nothing arrived on the stream within {timeout} s") from None
        if isinstance(got, BaseException):
            raise AssertionError(f"the stream failed: {got!r}") from got
        if got is None:
            raise AssertionError("the stream ended")
        return got

    def event(self, timeout: float = WAIT_S) -> exchange_pb2.Event:
        """The next event that is not a heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.item(max(0.01, deadline - time.monotonic()))
            if got.type != HEARTBEAT:
                return got

    def maybe_event(self, timeout: float) -> exchange_pb2.Event | None:
        """The next event that is not a heartbeat, or None if none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self._items.get(timeout=left)
            except queue.Empty:
                return None
            if isinstance(got, BaseException):
                raise AssertionError(f"the stream failed: {got!r}") from got
            if got is None:
                raise AssertionError("the stream ended")
            if got.type != HEARTBEAT:
                return got
        return None

    def events(self, n: int, timeout: float = WAIT_S) -> list[exchange_pb2.Event]:
        return [self.event(timeout) for _ in range(n)]

    def heartbeat(self, timeout: float = WAIT_S) -> exchange_pb2.Event:
        """The next item, which must be a heartbeat: proof that nothing else was pending."""
        got = self.item(timeout)
        assert got.type == HEARTBEAT, f"expected a heartbeat, got {describe(got)}"
        return got

    def error(self, timeout: float = WAIT_S) -> BaseException:
        try:
            got = self._items.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the stream neither failed nor ended within {timeout} s") from None
        assert isinstance(got, BaseException), f"expected the stream to fail, got {got!r}"
        return got

    def quiet(self, seconds: float) -> list[exchange_pb2.Event]:
        """Everything that arrives within `seconds` (for streams without heartbeats)."""
        out: list[exchange_pb2.Event] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self._items.get(timeout=left)
            except queue.Empty:
                break
            assert isinstance(got, exchange_pb2.Event), f"the stream stopped: {got!r}"
            out.append(got)
        return out

    def close(self) -> None:
        self.stream.close()
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "the stream did not stop after close()"


@contextmanager
def following(
    client: MerchantClient, cursor: str = "", *, heartbeats: bool = True, reconnect: bool = True
) -> Iterator[Follower]:
    follower = Follower(client.events(cursor, reconnect=reconnect, heartbeats=heartbeats))
    try:
        yield follower
    finally:
        follower.close()


@contextmanager
def following_from_now(client: MerchantClient) -> Iterator[tuple[Follower, exchange_pb2.Event]]:
    """A stream from an empty cursor, once the hub has fixed its start (its first heartbeat)."""
    with following(client) as follower:
        yield follower, follower.heartbeat()


def describe(event: exchange_pb2.Event) -> str:
    kind = exchange_pb2.EventType.Name(event.type)
    payload = event.WhichOneof("payload")
    detail = event.conversion.conversion_id if payload == "conversion" else payload
    return f"{kind}@{event.cursor}({event.merchant_id}: {detail})"


def cursor_key(cursor: str) -> tuple[int, int]:
    seq, idx = cursor.split(".")
    return int(seq), int(idx)


def summary(events: list[exchange_pb2.Event]) -> list[tuple[int, str]]:
    """(type, conversion id or whose value) of each event: what happened, in order."""
    return [
        (e.type, e.conversion.conversion_id if e.WhichOneof("payload") == "conversion" else e.merchant_id)
        for e in events
    ]


@dataclass
class Network:
    hub: RunningHub
    shop: MerchantClient  # source
    diner: MerchantClient  # destination
    unrel: MerchantClient  # no route to either
    shop_key: Ed25519PrivateKey


def link(source: MerchantClient, destination: MerchantClient, src_ref: str, dst_ref: str) -> None:
    code = source.create_link_code(src_ref).code
    destination.redeem_link_code(dst_ref, code)


def open_route(source: MerchantClient, destination: MerchantClient) -> None:
    source.set_route(destination.merchant_id, "outbound")
    destination.set_route(source.merchant_id, "inbound")


def build_network(hub: RunningHub) -> Network:
    shop, shop_key = hub.admit("shop", cap_micros=CAP)
    diner, _ = hub.admit("diner", cap_micros=CAP)
    unrel, _ = hub.admit("unrel", cap_micros=CAP)
    shop.enroll_member("alice-s")
    diner.enroll_member("alice-d")
    link(shop, diner, "alice-s", "alice-d")
    open_route(shop, diner)
    shop.issue_points("alice-s", 1_000_000)
    return Network(hub, shop, diner, unrel, shop_key)


def convert(net: Network, points: int = 100) -> exchange_pb2.Conversion:
    return net.shop.convert("alice-s", "diner", points)


def start_hub(tmp_path: Path, database_url: str | None) -> RunningHub:
    return RunningHub(tmp_path, database_url, config_overrides=FAST_EVENTS)


@pytest.fixture
def events_hub(tmp_path: Path, database_url: str | None) -> Iterator[RunningHub]:
    running = start_hub(tmp_path, database_url)
    try:
        yield running
        check_invariants(running.hub.engine)
    finally:
        running.stop()


@pytest.fixture
def net(events_hub: RunningHub) -> Iterator[Network]:
    network = build_network(events_hub)
    try:
        yield network
    finally:
        for client in (network.shop, network.diner, network.unrel):
            client.close()


def in_a_day() -> datetime:
    """A value change time past the default 24 h notice, whole seconds (the hub keeps milliseconds)."""
    return (datetime.now(UTC) + timedelta(hours=25)).replace(microsecond=0)


# --- what each side is told -------------------------------------------------------------------


def test_conversion_out_and_in_events_carry_each_sides_view(net: Network) -> None:
    with following_from_now(net.shop) as (shop_events, _), following_from_now(net.diner) as (diner_events, _):
        converted = convert(net, 100)
        out = shop_events.event()
        incoming = diner_events.event()
        assert shop_events.heartbeat().cursor == out.cursor, "one conversion, one event for the source"
        assert diner_events.heartbeat().cursor == incoming.cursor, "one conversion, one event for the destination"

    assert out.type == OUT and incoming.type == IN
    assert out.merchant_id == incoming.merchant_id == "shop"
    assert out.WhichOneof("payload") == incoming.WhichOneof("payload") == "conversion"
    # The source's event is exactly what Convert answered: its own member's ref, not the destination's.
    assert out.conversion == converted
    assert out.conversion.src_member_ref == "alice-s" and out.conversion.dst_member_ref == ""
    # The destination sees its own member's ref only, and otherwise the same conversion.
    assert incoming.conversion == net.diner.get_conversion(converted.conversion_id)
    assert incoming.conversion.src_member_ref == "" and incoming.conversion.dst_member_ref == "alice-d"
    shared = exchange_pb2.Conversion()
    shared.CopyFrom(incoming.conversion)
    shared.src_member_ref, shared.dst_member_ref = "alice-s", ""
    assert shared == converted
    c = incoming.conversion
    assert (c.source_merchant_id, c.destination_merchant_id, c.src_points, c.dst_points) == ("shop", "diner", 100, 99)
    assert (c.src_cash.micros, c.fee.micros, c.dst_cash.micros, c.platform.micros) == (
        1_000_000,
        10_000,
        990_000,
        10_000,
    )
    assert c.status == COMPLETED
    assert out.created_at == incoming.created_at == converted.created_at
    # Both announcements of one conversion belong to its one commit: same audit seq, in order.
    assert cursor_key(out.cursor)[0] == cursor_key(incoming.cursor)[0]
    assert cursor_key(out.cursor) < cursor_key(incoming.cursor)


def test_concurrent_conversions_are_each_announced_once_in_commit_order(net: Network) -> None:
    """Threads converting at once, and a batch beside them: the live streams miss none, repeat none,
    and deliver in cursor order; a replay later gives the very same sequence."""
    members = [f"m{i}" for i in range(4)]
    for ref in members:
        net.shop.enroll_member(f"{ref}-s")
        net.diner.enroll_member(f"{ref}-d")
        link(net.shop, net.diner, f"{ref}-s", f"{ref}-d")
        net.shop.issue_points(f"{ref}-s", 10_000)
    threads, each = 12, 3
    clients = [MerchantClient(net.hub.target, "shop", net.shop_key) for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def convert_some(index: int) -> list[str]:
        barrier.wait(WAIT_S)
        ref = f"{members[index % len(members)]}-s"
        return [clients[index].convert(ref, "diner", 100 + index).conversion_id for _ in range(each)]

    try:
        with (
            following_from_now(net.shop) as (shop_events, start),
            following_from_now(net.diner) as (diner_events, _),
            ThreadPoolExecutor(threads) as pool,
        ):
            futures = [pool.submit(convert_some, i) for i in range(threads)]
            items = [net.shop.conversion_request("alice-s", "diner", points) for points in (100, 200, 300)]
            items.insert(1, net.shop.conversion_request("alice-s", "diner", 10**9))  # refused: too few points
            barrier.wait(WAIT_S)
            response = net.shop.convert_batch(items)
            threaded = [i for f in futures for i in f.result(timeout=30)]
            total = threads * each + 3
            outs = shop_events.events(total)
            ins = diner_events.events(total)
            shop_events.heartbeat()
            diner_events.heartbeat()
    finally:
        for client in clients:
            client.close()

    outcomes = [r.WhichOneof("outcome") for r in response.results]
    assert outcomes == ["conversion", "error", "conversion", "conversion"]
    batch = [r.conversion.conversion_id for r in response.results if r.HasField("conversion")]
    assert len(set(threaded + batch)) == total
    for events, kind in ((outs, OUT), (ins, IN)):
        assert {t for t, _ in summary(events)} == {kind}
        ids = [i for _, i in summary(events)]
        assert sorted(ids) == sorted(threaded + batch), "each conversion announced exactly once"
        assert [i for i in ids if i in batch] == batch, "a batch's items are announced in item order"
        keys = [cursor_key(e.cursor) for e in events]
        assert keys == sorted(set(keys)), "delivered in strictly increasing cursor order"
    assert [e.conversion for e in outs if e.conversion.conversion_id in batch] == [
        r.conversion for r in response.results if r.HasField("conversion")
    ]
    with following(net.shop, start.cursor) as replay:
        assert replay.events(total) == outs
        replay.heartbeat()


def test_reversal_is_announced_to_both_sides(net: Network) -> None:
    with following_from_now(net.shop) as (shop_events, start), following_from_now(net.diner) as (diner_events, _):
        converted = convert(net, 100)
        assert summary([shop_events.event(), diner_events.event()]) == [
            (OUT, converted.conversion_id),
            (IN, converted.conversion_id),
        ]
        with net.hub.operator() as op:
            reversal = op.reverse_conversion(converted.conversion_id, reason="customer dispute")
            with pytest.raises(errors.AlreadyReversed):
                op.reverse_conversion(converted.conversion_id)  # refused: announces nothing
        shop_reversal = shop_events.event()
        diner_reversal = diner_events.event()
        shop_events.heartbeat()
        diner_events.heartbeat()

    for event, refs in ((shop_reversal, ("alice-s", "")), (diner_reversal, ("", "alice-d"))):
        assert event.type == REVERSAL and event.merchant_id == "shop"
        c = event.conversion
        assert c.conversion_id == converted.conversion_id == reversal.conversion_id
        assert c.status == REVERSED
        assert c.reversal_operation_id == reversal.reversal_operation_id
        assert (c.src_member_ref, c.dst_member_ref) == refs, "each side sees its own member's ref only"
        assert (c.src_points, c.dst_points, c.src_cash.micros) == (100, 99, 1_000_000)
        assert event.created_at == reversal.created_at
    assert net.shop.get_balance("alice-s").points == 1_000_000
    assert net.diner.get_balance("alice-d").points == 0

    # Replayed later, the conversion's own event still shows it as it completed; the reversal follows.
    with following(net.shop, start.cursor) as replay:
        out, rev = replay.events(2)
        replay.heartbeat()
    assert (out.type, out.conversion.status, out.conversion.reversal_operation_id) == (OUT, COMPLETED, "")
    assert out.conversion == converted
    assert rev == shop_reversal


def test_events_reach_only_the_merchants_concerned(net: Network) -> None:
    """shop -> diner and diner -> unrel: a value change reaches the merchant and its partners on either end
    of a route, not a partner's partner; a conversion reaches its two sides only."""
    shop, diner, unrel = net.shop, net.diner, net.unrel
    diner.enroll_member("carol-d")
    unrel.enroll_member("carol-u")
    link(diner, unrel, "carol-d", "carol-u")
    open_route(diner, unrel)
    diner.issue_points("carol-d", 1_000)
    effective = in_a_day()
    with (
        following_from_now(shop) as (shop_events, _),
        following_from_now(diner) as (diner_events, _),
        following_from_now(unrel) as (unrel_events, _),
    ):
        shop.schedule_point_value(12_000, effective)
        other = diner.convert("carol-d", "unrel", 100).conversion_id
        diner.schedule_point_value(8_000, effective + timedelta(hours=1))
        unrel.schedule_point_value(20_000, effective)
        own = convert(net, 100).conversion_id
        got = {
            "shop": shop_events.events(3),
            "diner": diner_events.events(5),
            "unrel": unrel_events.events(3),
        }
        for follower in (shop_events, diner_events, unrel_events):
            follower.heartbeat()
    assert summary(got["shop"]) == [(VALUE, "shop"), (VALUE, "diner"), (OUT, own)]
    assert summary(got["diner"]) == [(VALUE, "shop"), (OUT, other), (VALUE, "diner"), (VALUE, "unrel"), (IN, own)]
    assert summary(got["unrel"]) == [(IN, other), (VALUE, "diner"), (VALUE, "unrel")]

    values = {(e.merchant_id, e.point_value.value_micros) for events in got.values() for e in events if e.type == VALUE}
    assert values == {("shop", 12_000), ("diner", 8_000), ("unrel", 20_000)}
    for events in got.values():
        for event in events:
            if event.type == VALUE:
                assert event.WhichOneof("payload") == "point_value"
                when = effective + (timedelta(hours=1) if event.merchant_id == "diner" else timedelta(0))
                assert event.point_value.effective_at.ToDatetime(tzinfo=UTC) == when
    # One commit's announcements share its audit seq: shop's change as heard by shop and by diner.
    assert cursor_key(got["shop"][0].cursor)[0] == cursor_key(got["diner"][0].cursor)[0]


def test_refused_operations_announce_nothing(net: Network) -> None:
    shop, diner = net.shop, net.diner
    shop.enroll_member("bob-s")  # enrolled but not linked at diner
    with following_from_now(shop) as (shop_events, _), following_from_now(diner) as (diner_events, _):
        with pytest.raises(errors.InsufficientPoints):
            shop.convert("alice-s", "diner", 2_000_000)
        with pytest.raises(errors.NotLinked):
            shop.convert("bob-s", "diner", 100)
        with pytest.raises(errors.RouteClosed):
            shop.convert("alice-s", "unrel", 100)
        with pytest.raises(errors.MinDstPointsNotMet):
            shop.convert("alice-s", "diner", 100, min_dst_points=100)
        with pytest.raises(errors.NoticePeriodTooShort):
            shop.schedule_point_value(12_000, datetime.now(UTC) + timedelta(hours=1))
        with net.hub.operator() as op:
            op.set_net_debit_cap("shop", 500_000)
        with pytest.raises(errors.NetDebitCapExceeded):
            shop.convert("alice-s", "diner", 100)
        with net.hub.operator() as op:
            op.set_net_debit_cap("shop", CAP)
        # The first thing either side hears of is the one conversion that went through.
        converted = convert(net, 100)
        assert summary([shop_events.event()]) == [(OUT, converted.conversion_id)]
        assert summary([diner_events.event()]) == [(IN, converted.conversion_id)]
        shop_events.heartbeat()
        diner_events.heartbeat()


# --- cursors ----------------------------------------------------------------------------------


def test_empty_cursor_starts_now_and_a_stored_cursor_replays_what_followed(net: Network) -> None:
    before = [convert(net, 100).conversion_id for _ in range(2)]
    with following_from_now(net.shop) as (live, start):
        after = [convert(net, p).conversion_id for p in (101, 102, 103)]
        seen = live.events(3)
        live.heartbeat()
    assert summary(seen) == [(OUT, i) for i in after], f"not from now: earlier {before} leaked or order differs"
    keys = [cursor_key(e.cursor) for e in seen]
    assert keys == sorted(keys) and len(set(keys)) == 3, f"cursors not in commit order: {keys}"

    # From the start heartbeat's cursor: all three again, identical; from the first event: the other two.
    for cursor, expected in ((start.cursor, seen), (seen[0].cursor, seen[1:]), (seen[-1].cursor, [])):
        with following(net.shop, cursor) as replay:
            replayed = replay.events(len(expected))
            tail = replay.heartbeat()
        assert replayed == expected, f"replay from {cursor}: {summary(replayed)} != {summary(expected)}"
        assert tail.cursor == (expected[-1].cursor if expected else cursor)


@pytest.mark.parametrize("backend", ["sqlite"])  # paging is backend-neutral; 200+ conversions are slow on PostgreSQL
def test_replay_crosses_read_pages_in_order(net: Network) -> None:
    """More events than the hub reads at once: still every one, once, in order."""
    with following_from_now(net.shop) as (_live, start):
        pass
    items = [net.shop.conversion_request("alice-s", "diner", 2) for _ in range(PAGE + 1)]
    response = net.shop.convert_batch(items)
    ids = [r.conversion.conversion_id for r in response.results]
    assert all(r.WhichOneof("outcome") == "conversion" for r in response.results)
    with following(net.shop, start.cursor) as replay:
        replayed = replay.events(PAGE + 1, timeout=30)
        replay.heartbeat()
    assert summary(replayed) == [(OUT, i) for i in ids]


def test_reconnecting_from_the_saved_cursor_delivers_exactly_the_missed_events(net: Network) -> None:
    with following_from_now(net.shop) as (live, _):
        first = [convert(net, 100).conversion_id for _ in range(2)]
        seen = live.events(2)
        assert summary(seen) == [(OUT, i) for i in first]
    saved = live.stream.cursor  # the last event's, or a later heartbeat's: both mean "after seen[-1]"
    assert cursor_key(saved) >= cursor_key(seen[-1].cursor)

    # While disconnected: conversions out, a partner's value change, and a refusal.
    missed_ids = [convert(net, p).conversion_id for p in (110, 120)]
    net.diner.schedule_point_value(9_000, in_a_day())
    with pytest.raises(errors.InsufficientPoints):
        convert(net, 10**9)
    missed_ids.append(convert(net, 130).conversion_id)

    with following(net.shop, saved) as resumed:
        missed = resumed.events(4)
        resumed.heartbeat()
        later = convert(net, 140).conversion_id
        assert summary([resumed.event()]) == [(OUT, later)]
        resumed.heartbeat()
    assert summary(missed) == [(OUT, missed_ids[0]), (OUT, missed_ids[1]), (VALUE, "diner"), (OUT, missed_ids[2])]


def test_heartbeats_arrive_when_idle_and_carry_a_cursor_that_resumes(net: Network) -> None:
    with following(net.shop) as idle:
        started = time.monotonic()
        beats = [idle.heartbeat() for _ in range(3)]
        elapsed = time.monotonic() - started
    assert elapsed >= 2 * HEARTBEAT_S * 0.9, f"three heartbeats in {elapsed:.2f} s: not spaced by the interval"
    for beat in beats:
        assert beat.merchant_id == "shop" and beat.cursor and beat.WhichOneof("payload") is None
        assert beat.created_at.seconds > 0
    assert len({b.cursor for b in beats}) == 1, "nothing happened, so the cursor stayed put"
    quiet_cursor = beats[-1].cursor

    converted = convert(net, 100)  # while no stream is open
    with following(net.shop, quiet_cursor) as resumed:
        event = resumed.event()
        beat = resumed.heartbeat()
    assert summary([event]) == [(OUT, converted.conversion_id)]
    assert beat.cursor == event.cursor, "a heartbeat after an event carries that event's cursor"

    second = convert(net, 100)
    with following(net.shop, beat.cursor) as resumed:
        assert summary([resumed.event()]) == [(OUT, second.conversion_id)]
        resumed.heartbeat()

    # Without heartbeats=True the SDK swallows them, yet keeps their cursor: a quiet stream from now
    # still knows where to resume.
    with following(net.shop, heartbeats=False) as silent:
        assert silent.quiet(3 * HEARTBEAT_S) == []
        resume_at = silent.stream.cursor
    assert resume_at, "the swallowed heartbeats' cursor is kept"
    third = convert(net, 100)
    with following(net.shop, resume_at) as resumed:
        assert summary([resumed.event()]) == [(OUT, third.conversion_id)]
        resumed.heartbeat()


# --- refusals of the stream itself ------------------------------------------------------------


MALFORMED_CURSORS = [
    "abc",
    "1",
    "1.",
    ".1",
    "-1.0",
    "1.-1",
    "1.2.3",
    " 1.2",
    "1.2 ",
    "1,2",
    "١.٢",  # digits, but not ASCII ones
    "9" * 41,
    "1.2147483648",  # idx past 2**31 - 1
    "9223372036854775808.0",  # seq past int64
    "1e3.0",
]


def test_malformed_cursors_are_refused_with_invalid_cursor(events_hub: RunningHub) -> None:
    client, _ = events_hub.admit("shop", cap_micros=CAP)
    with client:
        for cursor in MALFORMED_CURSORS:
            with following(client, cursor) as stream:  # reconnect=True: a refusal is not retried
                error = stream.error()
            assert type(error) is errors.InvalidCursor, f"{cursor!r}: got {error!r}"
            assert isinstance(error, errors.PointsxError)
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_CURSOR", cursor


def test_streaming_another_merchants_events_is_refused(net: Network) -> None:
    with following_from_now(net.diner) as (diner_events, _):
        for reconnect in (True, False):
            follower = Follower(EventStream(net.shop._transport, "diner", reconnect=reconnect, heartbeats=True))
            try:
                error = follower.error()
            finally:
                follower.close()
            assert type(error) is errors.CrossMerchantAccess, repr(error)
            assert isinstance(error, errors.PointsxError)
            assert error.code == grpc.StatusCode.PERMISSION_DENIED and error.reason == "CROSS_MERCHANT_ACCESS"
        # Naming itself explicitly is fine, and diner's own stream is unaffected.
        converted = convert(net, 100)
        own = Follower(EventStream(net.shop._transport, "shop", "", heartbeats=True))
        try:
            own.heartbeat()
        finally:
            own.close()
        assert summary([diner_events.event()]) == [(IN, converted.conversion_id)]


# --- a hub restart under a live stream -------------------------------------------------------


class RestartedHub:
    """Another hub process on the first one's data directory and database: on its port, or on a new one."""

    def __init__(
        self,
        first: RunningHub,
        database_url: str | None,
        *,
        same_port: bool = True,
        overrides: dict[str, object] | None = None,
    ) -> None:
        cfg = replace(config_mod.load(first.config.data_dir), **(overrides or FAST_EVENTS))  # type: ignore[arg-type]
        self.hub = open_hub(cfg, database_url=database_url, migrate_now=True)
        try:
            self._background = BackgroundHub(self.hub, f"127.0.0.1:{first.port if same_port else 0}")
        except BaseException:
            self.hub.close()
            self.hub.engine.dispose()
            raise
        self.target = self._background.target
        assert (self.target == first.target) == same_port

    def stop(self) -> None:
        self._background.stop()


def test_sdk_stream_survives_a_hub_restart(tmp_path: Path, database_url: str | None) -> None:
    first = start_hub(tmp_path, database_url)
    second: RestartedHub | None = None
    network = build_network(first)
    try:
        with following_from_now(network.shop) as (shop_events, _), following_from_now(network.diner) as (diner, _):
            before = [convert(network, 100).conversion_id for _ in range(2)]
            assert summary(shop_events.events(2)) == [(OUT, i) for i in before]
            assert summary(diner.events(2)) == [(IN, i) for i in before]

            first.stop()
            second = RestartedHub(first, database_url)
            # Converting right away races the streams' reconnects; either way each event comes once.
            after = [convert(network, p).conversion_id for p in (101, 102)]
            assert summary(shop_events.events(2, timeout=30)) == [(OUT, i) for i in after]
            assert summary(diner.events(2, timeout=30)) == [(IN, i) for i in after]
            last = convert(network, 103).conversion_id
            assert summary([shop_events.event()]) == [(OUT, last)]
            assert summary([diner.event()]) == [(IN, last)]
            shop_events.heartbeat()
            diner.heartbeat()
            assert shop_events.stream.reconnects >= 1 and diner.stream.reconnects >= 1
        check_invariants(second.hub.engine)
    finally:
        for client in (network.shop, network.diner, network.unrel):
            client.close()
        if second is not None:
            second.stop()
        first.stop()


def test_client_calls_succeed_right_after_a_hub_restart(tmp_path: Path) -> None:
    """A client whose channel kept failing while the hub was down reaches it as soon as it is back.

    (Regression: merchant_sdk/transport.py retried UNAVAILABLE for at most ~0.7 s while the grpc channel
    backed off reconnecting from 1 s up to 120 s, on a subchannel shared process-wide, so after a restart
    calls kept failing for seconds — growing with the downtime — though the hub was serving again.)
    """
    first = start_hub(tmp_path, None)
    second: RestartedHub | None = None
    client, _ = first.admit("shop")
    try:
        client.enroll_member("alice")
        first.stop()
        # While the hub is down a stand-in holds its port and counts the client's reconnect attempts
        # (accepting and dropping each: a failed connect, like the refused ones of a port nobody holds).
        with ReconnectCounter(first.port) as counter:
            with pytest.raises(errors.TransientError):
                client.get_balance("alice")  # the merchant's app tries while the hub is down
            counter.wait_for(3)  # the channel's own reconnect attempts: it has been backing off a while
        second = RestartedHub(first, None)
        assert client.get_balance("alice").points == 0, "the hub is serving again: the next call should reach it"
    finally:
        client.close()
        if second is not None:
            second.stop()
        first.stop()


class ReconnectCounter:
    """Listens on a port, drops every connection at once, and counts them."""

    def __init__(self, port: int) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(16)
        self._sock.settimeout(0.02)
        self._stop = threading.Event()
        self.attempts = 0
        self._thread = threading.Thread(target=self._accept, name="reconnect-counter", daemon=True)

    def __enter__(self) -> ReconnectCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, no TIME_WAIT
            conn.close()
            self.attempts += 1

    def wait_for(self, attempts: int) -> None:
        deadline = time.monotonic() + 20
        while self.attempts < attempts:
            assert time.monotonic() < deadline, f"only {self.attempts} reconnect attempts in 20 s"
            time.sleep(0.005)


QUIET_EVENTS: dict[str, object] = {"event_poll_s": 0.05, "event_heartbeat_s": 15.0}  # the default heartbeat


def test_stream_from_now_that_saw_nothing_yet_misses_nothing_across_a_reconnect(tmp_path: Path) -> None:
    """A stream from now, cut off before anything happened, resumes from where it started, not a later now.

    (Regression: StreamEvents sent no position until its first heartbeat, event_heartbeat_s later, so the SDK
    reconnected with cursor '' — "from now" again, re-anchored at the reconnect — and skipped every event
    committed while it was disconnected.)
    """
    first = RunningHub(tmp_path, None, config_overrides=QUIET_EVENTS)
    others: list[RestartedHub] = []
    network = build_network(first)
    try:
        with following(network.shop, heartbeats=False) as stream:
            time.sleep(0.5)  # the hub has fixed the stream's start; nothing has happened since
            first.stop()
            # While the stream is cut off, the network moves on: another hub process on the same database
            # (scale-out) takes a conversion.
            elsewhere = RestartedHub(first, None, same_port=False, overrides=QUIET_EVENTS)
            others.append(elsewhere)
            with MerchantClient(elsewhere.target, "shop", network.shop_key) as client:
                missed = client.convert("alice-s", "diner", 100).conversion_id
            elsewhere.stop()
            others.append(RestartedHub(first, None, overrides=QUIET_EVENTS))
            # Convert now and then until the reconnected stream shows something: whatever it shows first
            # must be the conversion it missed while it was cut off.
            later: list[str] = []
            deadline = time.monotonic() + 30
            first_seen: exchange_pb2.Event | None = None
            while first_seen is None:
                assert time.monotonic() < deadline, "the stream did not come back within 30 s"
                later.append(convert(network, 101).conversion_id)
                first_seen = stream.maybe_event(1.0)
            assert stream.stream.reconnects >= 1
            assert summary([first_seen]) == [(OUT, missed)], (
                f"it skipped {missed}, made while it was disconnected: the first it showed was {describe(first_seen)}"
            )
            assert summary(stream.events(len(later))) == [(OUT, i) for i in later]
    finally:
        for client in (network.shop, network.diner, network.unrel):
            client.close()
        for hub in others:
            hub.stop()
        first.stop()
