"""Conversion scenarios over real gRPC (DESIGN §1-§4): routes, conversions, quotes, limits,
idempotency, ConvertBatch and reversal.

Amounts are checked against DESIGN §1 computed here, independently of `exchange.domain`. Every
refusal is checked for its SDK class, status code and ErrorInfo reason, and for changing nothing:
both members' balances and activity, read afterwards, are as before. Scenarios where time matters
run on a hub with a manual clock (started at the wall clock, with a wide signature window, so the
SDK's real-time signatures still pass).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from exchange.domain.clock import ManualClock
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import common_pb2, exchange_pb2, ledger_pb2
from tests.auditor import check_invariants
from tests.harness import RunningHub

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED

A, B, C = "alpha", "beta", "gamma"  # merchants; A is the usual source, B the usual destination
ALICE, ALICE_B, ALICE_C = "alice", "alice-b", "alice-c"  # one person's accounts at A, B and C
BIG_CAP = 10**12  # a net debit cap no scenario reaches unless it is about the cap
DEFAULT_FEE_BPS = 100  # the network default (hub config)
QUOTE_TTL_MS = 30_000  # the default quote_ttl_s
DAY_MS = 86_400_000
CONVERT = "/pointsx.v1.ExchangeService/Convert"
COMPLETED = exchange_pb2.CONVERSION_STATUS_COMPLETED
REVERSED = exchange_pb2.CONVERSION_STATUS_REVERSED
PENDING, OPEN, CLOSED = common_pb2.ROUTE_STATE_PENDING, common_pb2.ROUTE_STATE_OPEN, common_pb2.ROUTE_STATE_CLOSED

Account = tuple[MerchantClient, str]
Snapshot = tuple[int, list[str]]


# --- arithmetic, computed here (DESIGN §1) --------------------------------------------------------


@dataclass(frozen=True)
class Amounts:
    src_points: int
    src_value: int
    dst_value: int
    fee_bps: int
    src_cash: int
    fee: int
    dst_points: int
    dst_cash: int
    residue: int

    @property
    def platform(self) -> int:
        return self.fee + self.residue


def amounts(src_points: int, src_value: int, dst_value: int, fee_bps: int) -> Amounts:
    src_cash = src_points * src_value
    fee = -(-(src_cash * fee_bps) // 10_000)  # ceil
    dst_points = (src_cash - fee) // dst_value  # floor
    dst_cash = dst_points * dst_value
    residue = src_cash - fee - dst_cash
    assert 0 <= residue < dst_value and src_cash == dst_cash + fee + residue
    return Amounts(src_points, src_value, dst_value, fee_bps, src_cash, fee, dst_points, dst_cash, residue)


def smallest_src_for(dst_points: int, src_value: int, dst_value: int, fee_bps: int) -> int:
    """By plain search: the first src_points whose conversion yields at least `dst_points`."""
    src = 1
    while amounts(src, src_value, dst_value, fee_bps).dst_points < dst_points:
        src += 1
    return src


def assert_amounts(got: exchange_pb2.Conversion | exchange_pb2.Quote, want: Amounts, currency: str = "CNY") -> None:
    assert (got.src_points, got.dst_points) == (want.src_points, want.dst_points)
    assert (got.src_value_micros, got.dst_value_micros, got.fee_bps) == (want.src_value, want.dst_value, want.fee_bps)
    cash = {
        "src_cash": want.src_cash,
        "fee": want.fee,
        "dst_cash": want.dst_cash,
        "residue": want.residue,
        "platform": want.platform,
    }
    for name, micros in cash.items():
        field: common_pb2.Cash = getattr(got, name)
        assert (field.currency, field.micros) == (currency, micros), f"{name}: {field} != {micros} {currency}"


# --- helpers --------------------------------------------------------------------------------------


def snapshot(client: MerchantClient, member_ref: str) -> Snapshot:
    """A member's balance and every operation id of its activity, newest first."""
    return client.get_balance(member_ref).points, [a.operation_id for a in client.iter_activity(member_ref)]


def snapshots(watch: Sequence[Account]) -> list[Snapshot]:
    """`snapshot` of each watched member, read concurrently (reads only: the order does not matter)."""
    if not watch:
        return []
    with ThreadPoolExecutor(max_workers=len(watch)) as pool:
        return list(pool.map(lambda account: snapshot(*account), watch))


def points(*accounts: Account) -> list[int]:
    return [client.get_balance(ref).points for client, ref in accounts]


@contextmanager
def refused(
    cls: type[errors.PointsxError],
    code: grpc.StatusCode,
    reason: str,
    watch: Sequence[Account] = (),
    **metadata: str,
) -> Iterator[None]:
    """The block must fail with exactly `cls`, `code` and `reason` (and the given ErrorInfo metadata),
    leaving every watched member's balance and activity as it was."""
    before = snapshots(watch)
    with pytest.raises(errors.PointsxError) as info:
        yield
    error = info.value
    assert type(error) is cls, f"expected {cls.__name__}, got {type(error).__name__}: {error}"
    assert error.code == code, f"{reason}: expected {code}, got {error.code} ({error})"
    assert error.reason == reason, f"expected {reason}, got {error.reason!r} ({error})"
    for key, value in metadata.items():
        assert error.metadata.get(key) == value, f"{reason} metadata {key}: {error.metadata}"
    after = snapshots(watch)
    assert after == before, f"{reason} changed balances or activity: {before} -> {after}"


def assert_item_error(
    result: exchange_pb2.ConvertBatchResult, cls: type[errors.PointsxError], code: grpc.StatusCode, reason: str
) -> None:
    assert result.WhichOneof("outcome") == "error", f"item {result.index}: {result}"
    error = errors.from_status(result.error)
    assert type(error) is cls, f"item {result.index}: expected {cls.__name__}, got {type(error).__name__}: {error}"
    assert (error.code, error.reason) == (code, reason)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def at(ms: int) -> datetime:
    """An exact UTC datetime for a millisecond timestamp (no float rounding)."""
    return datetime.fromtimestamp(ms // 1000, UTC) + timedelta(milliseconds=ms % 1000)


class Net:
    """Merchants admitted on one hub; closes their clients at the end."""

    def __init__(self, hub: RunningHub) -> None:
        self.hub = hub
        self._clients: list[MerchantClient] = []

    def merchant(
        self, merchant_id: str, *, currency: str = "CNY", value_micros: int = 10_000, cap_micros: int = BIG_CAP
    ) -> MerchantClient:
        client, _key = self.hub.admit(merchant_id, currency=currency, value_micros=value_micros, cap_micros=cap_micros)
        self._clients.append(client)
        return client

    def member(self, client: MerchantClient, member_ref: str, issued: int = 0) -> Account:
        client.enroll_member(member_ref)
        if issued:
            client.issue_points(member_ref, issued)
        return client, member_ref

    def terms(self, source: str, destination: str, **terms: int | bool | None) -> common_pb2.Route:
        with self.hub.operator() as op:
            return op.set_route_terms(source, destination, **terms)  # type: ignore[arg-type]

    def pair(
        self,
        *,
        src_value: int = 10_000,
        dst_value: int = 10_000,
        issued: int = 1_000,
        src_cap: int = BIG_CAP,
        dst_cap: int = BIG_CAP,
        source: str = A,
        destination: str = B,
        **terms: int | bool | None,
    ) -> tuple[MerchantClient, MerchantClient]:
        """Source and destination (A and B) with an open route, alice at the source (holding `issued`) linked
        to alice-b at the destination."""
        a = self.merchant(source, value_micros=src_value, cap_micros=src_cap)
        b = self.merchant(destination, value_micros=dst_value, cap_micros=dst_cap)
        self.member(a, ALICE, issued)
        self.member(b, ALICE_B)
        link(a, ALICE, b, ALICE_B)
        open_route(a, b)
        if terms:
            self.terms(source, destination, **terms)
        return a, b

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def link(a: MerchantClient, a_ref: str, b: MerchantClient, b_ref: str) -> None:
    """One person's accounts: a code made at `a`, redeemed at `b`."""
    b.redeem_link_code(b_ref, a.create_link_code(a_ref).code)


def open_route(source: MerchantClient, destination: MerchantClient) -> None:
    assert source.set_route(destination.merchant_id, "outbound").outbound_open
    route = destination.set_route(source.merchant_id, "inbound")
    assert route.inbound_accepted and route.state == OPEN


@pytest.fixture
def net(hub: RunningHub) -> Iterator[Net]:
    network = Net(hub)
    try:
        yield network
    finally:
        network.close()


@contextmanager
def clocked_network(
    tmp_path: Path, database_url: str | None, start_ms: int, **overrides: object
) -> Iterator[tuple[Net, ManualClock]]:
    clock = ManualClock(start_ms)
    config: dict[str, object] = {"auth_window_s": 3600, **overrides}
    running = RunningHub(tmp_path, database_url, clock=clock, config_overrides=config)
    network = Net(running)
    try:
        yield network, clock
        network.close()
        check_invariants(running.hub.engine)
    finally:
        network.close()
        running.stop()


@pytest.fixture
def clocked(tmp_path: Path, database_url: str | None) -> Iterator[tuple[Net, ManualClock]]:
    """A hub on a manual clock: 60 s reversal window, 10 s notice period, default 30 s quote TTL."""
    with clocked_network(tmp_path, database_url, wall_ms(), reversal_window_s=60, notice_period_s=10) as pair:
        yield pair


# --- the happy path -------------------------------------------------------------------------------


def test_conversion_amounts_balances_and_who_sees_what(net: Net) -> None:
    a, b = net.pair(src_value=10_007, dst_value=30_000, issued=2_000, fee_bps=250)
    c = net.merchant(C)
    want = amounts(1_234, 10_007, 30_000, 250)
    # The figures, by hand: 12,348,638 micros; fee ceil(308,715.95); 12,039,922 // 30,000 = 401 points.
    assert (want.src_cash, want.fee, want.dst_points, want.dst_cash, want.residue) == (
        12_348_638, 308_716, 401, 12_030_000, 9_922,
    )  # fmt: skip

    done = a.convert(ALICE, B, 1_234)
    assert_amounts(done, want)
    assert (done.source_merchant_id, done.destination_merchant_id) == (A, B)
    assert (done.src_member_ref, done.dst_member_ref) == (ALICE, ""), "the source never sees D's member ref"
    assert done.status == COMPLETED and done.quote_id == "" and done.reversal_operation_id == ""
    assert points((a, ALICE), (b, ALICE_B)) == [2_000 - 1_234, 401]

    out = next(a.iter_activity(ALICE))
    assert (out.operation_id, out.kind, out.points_delta, out.counterparty_merchant_id) == (
        done.conversion_id, ledger_pb2.ACTIVITY_KIND_CONVERT_OUT, -1_234, B,
    )  # fmt: skip
    into = next(b.iter_activity(ALICE_B))
    assert (into.operation_id, into.kind, into.points_delta, into.counterparty_merchant_id) == (
        done.conversion_id, ledger_pb2.ACTIVITY_KIND_CONVERT_IN, 401, A,
    )  # fmt: skip

    assert a.get_conversion(done.conversion_id) == done
    seen_by_b = b.get_conversion(done.conversion_id)
    assert (seen_by_b.src_member_ref, seen_by_b.dst_member_ref) == ("", ALICE_B), "D never sees S's member ref"
    assert_amounts(seen_by_b, want)
    assert seen_by_b.conversion_id == done.conversion_id and seen_by_b.status == COMPLETED

    with refused(errors.CrossMerchantAccess, PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS"):
        c.get_conversion(done.conversion_id)
    with refused(errors.ConversionNotFound, NOT_FOUND, "CONVERSION_NOT_FOUND"):
        a.get_conversion("op_9999999999999999")
    with refused(errors.ConversionNotFound, NOT_FOUND, "CONVERSION_NOT_FOUND"):
        a.get_conversion(a.issue_points(ALICE, 1).operation_id)  # an operation, but not a conversion


def test_amount_too_small_too_large_and_min_dst_points(net: Net) -> None:
    a, b = net.pair(src_value=10_000, dst_value=30_000, issued=1_100)
    watch = [(a, ALICE), (b, ALICE_B)]
    # 3 points: 30,000 - 300 fee leaves 29,700 < one point of 30,000.
    assert amounts(3, 10_000, 30_000, DEFAULT_FEE_BPS).dst_points == 0
    with refused(errors.AmountTooSmall, FAILED_PRECONDITION, "AMOUNT_TOO_SMALL", watch):
        a.convert(ALICE, B, 3)
    with refused(errors.AmountTooSmall, FAILED_PRECONDITION, "AMOUNT_TOO_SMALL", watch):
        a.quote_conversion(ALICE, B, src_points=3)

    done = a.convert(ALICE, B, 4)
    assert_amounts(done, amounts(4, 10_000, 30_000, DEFAULT_FEE_BPS))
    assert (done.fee_bps, done.dst_points, done.residue.micros) == (100, 1, 9_600)
    assert points(*watch) == [1_096, 1]

    # 1,000 points: 10,000,000 - 100,000 fee = 9,900,000 micros = 330 points.
    assert amounts(1_000, 10_000, 30_000, DEFAULT_FEE_BPS).dst_points == 330
    with refused(
        errors.MinDstPointsNotMet, FAILED_PRECONDITION, "MIN_DST_POINTS_NOT_MET", watch, dst_points="330",
        min_dst_points="331",
    ):  # fmt: skip
        a.convert(ALICE, B, 1_000, min_dst_points=331)
    assert a.convert(ALICE, B, 1_000, min_dst_points=330).dst_points == 330
    assert points(*watch) == [96, 331]

    # The operator's route minimum and maximum.
    a.issue_points(ALICE, 904)  # 1,000
    net.terms(A, B, min_src_points=10, max_src_points=100)
    with refused(errors.AmountTooSmall, FAILED_PRECONDITION, "AMOUNT_TOO_SMALL", watch, min_src_points="10"):
        a.convert(ALICE, B, 9)
    with refused(errors.AmountTooSmall, FAILED_PRECONDITION, "AMOUNT_TOO_SMALL", min_src_points="10"):
        a.quote_conversion(ALICE, B, src_points=9)
    with refused(errors.AmountTooLarge, FAILED_PRECONDITION, "AMOUNT_TOO_LARGE", watch, max_src_points="100"):
        a.convert(ALICE, B, 101)
    with refused(errors.AmountTooLarge, FAILED_PRECONDITION, "AMOUNT_TOO_LARGE", max_src_points="100"):
        a.quote_conversion(ALICE, B, src_points=101)
    # 40 destination points need more than 100 source points.
    assert smallest_src_for(40, 10_000, 30_000, DEFAULT_FEE_BPS) > 100
    with refused(errors.AmountTooLarge, FAILED_PRECONDITION, "AMOUNT_TOO_LARGE", max_src_points="100"):
        a.quote_conversion(ALICE, B, dst_points=40)

    low = a.convert(ALICE, B, 10)
    high = a.convert(ALICE, B, 100)
    assert (low.dst_points, high.dst_points) == (3, 33)
    assert points(*watch) == [890, 331 + 36]


def test_a_conversion_never_issues_more_than_10_12_destination_points(net: Net) -> None:
    a, b = net.pair(src_value=10**9, dst_value=1, issued=10_000, src_cap=10**14, fee_bps=0)
    watch = [(a, ALICE), (b, ALICE_B)]
    assert a.convert(ALICE, B, 1_000).dst_points == 10**12  # exactly the most one operation moves
    assert amounts(1_001, 10**9, 1, 0).dst_points == 10**12 + 10**9
    with refused(errors.AmountTooLarge, FAILED_PRECONDITION, "AMOUNT_TOO_LARGE"):
        a.quote_conversion(ALICE, B, src_points=1_001)
    with refused(errors.AmountTooLarge, FAILED_PRECONDITION, "AMOUNT_TOO_LARGE", watch):
        a.convert(ALICE, B, 1_001)


# --- refusals -------------------------------------------------------------------------------------


def test_route_closed_until_both_sides_agree_and_the_operator_allows(net: Net) -> None:
    a = net.merchant(A)
    b = net.merchant(B)
    net.member(a, ALICE, 1_000)
    net.member(b, ALICE_B)
    link(a, ALICE, b, ALICE_B)
    watch = [(a, ALICE), (b, ALICE_B)]

    def closed(state: str) -> None:
        with refused(errors.RouteClosed, FAILED_PRECONDITION, "ROUTE_CLOSED", watch, state=state):
            a.convert(ALICE, B, 10)
        with refused(errors.RouteClosed, FAILED_PRECONDITION, "ROUTE_CLOSED", state=state):
            a.quote_conversion(ALICE, B, src_points=10)

    closed("none")  # no route at all
    assert a.set_route(B, "outbound").state == PENDING
    closed("pending")  # only outbound
    assert a.set_route(B, "outbound", enabled=False).state == PENDING
    assert b.set_route(A, "inbound").state == PENDING
    closed("pending")  # only inbound
    assert a.set_route(B, "outbound").state == OPEN
    a.convert(ALICE, B, 10)
    assert points(*watch) == [990, 9]

    # A route is one direction: A -> B being open does not let B convert to A.
    with refused(errors.RouteClosed, FAILED_PRECONDITION, "ROUTE_CLOSED", watch, state="none"):
        b.convert(ALICE_B, A, 5)

    live = a.quote_conversion(ALICE, B, src_points=10)
    assert net.terms(A, B, closed=True).state == CLOSED
    closed("closed")  # operator-closed, though both sides agree
    with refused(errors.RouteClosed, FAILED_PRECONDITION, "ROUTE_CLOSED", watch, state="closed"):
        a.convert(ALICE, B, quote_id=live.quote_id)  # a live quote does not keep a closed route open
    assert net.terms(A, B, closed=False).state == OPEN
    a.convert(ALICE, B, 10)

    assert a.set_route(B, "outbound", enabled=False).state == PENDING
    closed("pending")  # the source withdrew
    a.set_route(B, "outbound")
    assert b.set_route(A, "inbound", enabled=False).state == PENDING
    closed("pending")  # the destination withdrew
    b.set_route(A, "inbound")
    a.convert(ALICE, B, 10)
    assert points(*watch) == [970, 27]


def test_not_linked_and_unknown_member(net: Net) -> None:
    a, b = net.pair(issued=100)
    c = net.merchant(C)
    net.member(a, "bob", 100)
    net.member(c, "bob-c")
    link(a, "bob", c, "bob-c")  # bob is linked, but not at B
    net.member(a, "carol", 100)  # carol is linked nowhere
    net.member(b, "carol-b")
    watch = [(a, "bob"), (a, "carol"), (b, "carol-b")]

    for member_ref in ("bob", "carol"):
        with refused(
            errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED", watch, member_ref=member_ref,
            destination_merchant_id=B,
        ):  # fmt: skip
            a.convert(member_ref, B, 10)
        with refused(errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED"):
            a.quote_conversion(member_ref, B, src_points=10)
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND", watch):
        a.convert("nobody", B, 10)

    a.convert(ALICE, B, 10)
    b.unlink(ALICE_B)  # the person unlinks at B: no more conversions to B
    with refused(errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED", watch):
        a.convert(ALICE, B, 10)
    assert points((a, ALICE), (b, ALICE_B)) == [90, 9]


def test_currency_mismatch_for_routes_and_conversions(net: Net) -> None:
    a = net.merchant(A)
    usd = net.merchant("usd-shop", currency="USD")
    net.member(a, ALICE, 100)
    net.member(usd, "alice-u")
    link(a, ALICE, usd, "alice-u")
    watch = [(a, ALICE), (usd, "alice-u")]

    def mismatch(watched: Sequence[Account] = ()) -> AbstractContextManager[None]:
        return refused(
            errors.CurrencyMismatch, FAILED_PRECONDITION, "CURRENCY_MISMATCH", watched, source_currency="CNY",
            destination_currency="USD",
        )  # fmt: skip

    with mismatch():
        a.set_route("usd-shop", "outbound")
    with mismatch():
        usd.set_route(A, "inbound")
    with mismatch():
        net.terms(A, "usd-shop", fee_bps=0)
    with mismatch(watch):
        a.convert(ALICE, "usd-shop", 10)
    with mismatch():
        a.quote_conversion(ALICE, "usd-shop", src_points=10)
    assert a.list_routes() == [] and usd.list_routes() == []


def test_merchant_suspended_as_source_and_as_destination(net: Net) -> None:
    a, b = net.pair(issued=1_000)
    watch = [(a, ALICE), (b, ALICE_B)]
    quote = a.quote_conversion(ALICE, B, src_points=100)

    for suspended in (A, B):
        with net.hub.operator() as op:
            op.set_merchant_status(suspended, active=False, reason="review")
        with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED", watch, merchant_id=suspended):
            a.convert(ALICE, B, 10)
        with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED", watch):
            a.convert(ALICE, B, quote_id=quote.quote_id)
        with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED", merchant_id=suspended):
            a.quote_conversion(ALICE, B, src_points=10)
        with net.hub.operator() as op:
            op.set_merchant_status(suspended, active=True)

    done = a.convert(ALICE, B, quote_id=quote.quote_id)
    assert (done.src_points, done.dst_points, done.quote_id) == (100, 99, quote.quote_id)
    assert points(*watch) == [900, 99]


def test_same_merchant_and_insufficient_points(net: Net) -> None:
    a, b = net.pair(issued=100)
    watch = [(a, ALICE), (b, ALICE_B)]
    with refused(errors.SameMerchant, INVALID_ARGUMENT, "SAME_MERCHANT", watch):
        a.convert(ALICE, A, 10)
    with refused(errors.SameMerchant, INVALID_ARGUMENT, "SAME_MERCHANT"):
        a.quote_conversion(ALICE, A, src_points=10)
    with refused(errors.SameMerchant, INVALID_ARGUMENT, "SAME_MERCHANT"):
        a.set_route(A, "outbound")
    with refused(errors.SameMerchant, INVALID_ARGUMENT, "SAME_MERCHANT"):
        net.terms(A, A, fee_bps=0)

    with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS", watch, balance="100"):
        a.convert(ALICE, B, quote_id=a.quote_conversion(ALICE, B, src_points=101).quote_id)
    with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS", watch, balance="100"):
        a.convert(ALICE, B, 101)
    a.convert(ALICE, B, 100)
    assert points(*watch) == [0, 99]
    with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS", watch, balance="0"):
        a.convert(ALICE, B, 2)  # the least that yields a point


def test_daily_member_cap(net: Net) -> None:
    a, b = net.pair(issued=1_000, daily_member_cap_micros=1_000_000)
    c = net.merchant(C)
    net.member(c, ALICE_C)
    link(a, ALICE, c, ALICE_C)
    open_route(a, c)
    net.member(a, "bob", 1_000)
    net.member(b, "bob-b")
    link(a, "bob", b, "bob-b")
    watch = [(a, ALICE), (b, ALICE_B)]

    a.convert(ALICE, B, 40)  # 400,000 micros
    a.convert(ALICE, B, 40)  # 800,000
    with refused(
        errors.DailyLimitExceeded, FAILED_PRECONDITION, "DAILY_LIMIT_EXCEEDED", watch, member_ref=ALICE,
        used_micros="800000", cap_micros="1000000",
    ):  # fmt: skip
        a.convert(ALICE, B, 40)  # would be 1,200,000
    a.convert(ALICE, B, 20)  # exactly the cap
    with refused(errors.DailyLimitExceeded, FAILED_PRECONDITION, "DAILY_LIMIT_EXCEEDED", watch):
        a.convert(ALICE, B, 2)  # the least that yields a point
    with refused(errors.DailyLimitExceeded, FAILED_PRECONDITION, "DAILY_LIMIT_EXCEEDED", watch):
        a.convert(ALICE, B, quote_id=a.quote_conversion(ALICE, B, src_points=2).quote_id)
    assert points(*watch) == [900, 39 + 39 + 19]

    # The cap is per member and per route.
    a.convert("bob", B, 100)
    a.convert(ALICE, C, 50)
    assert points((a, "bob"), (b, "bob-b"), (a, ALICE), (c, ALICE_C)) == [900, 99, 850, 49]


def test_daily_member_cap_resets_at_utc_midnight(tmp_path: Path, database_url: str | None) -> None:
    midnight = (wall_ms() // DAY_MS + 1) * DAY_MS
    with clocked_network(tmp_path, database_url, midnight - 20_000, auth_window_s=2 * 86_400) as (net, clock):
        a, b = net.pair(issued=1_000, daily_member_cap_micros=1_000_000)
        watch = [(a, ALICE), (b, ALICE_B)]
        a.convert(ALICE, B, 60)
        clock.advance(20_000 - 1)  # 23:59:59.999
        a.convert(ALICE, B, 40)
        with refused(errors.DailyLimitExceeded, FAILED_PRECONDITION, "DAILY_LIMIT_EXCEEDED", watch):
            a.convert(ALICE, B, 2)  # the least that yields a point
        clock.advance(1)  # 00:00:00.000: a new UTC day
        a.convert(ALICE, B, 100)
        with refused(
            errors.DailyLimitExceeded, FAILED_PRECONDITION, "DAILY_LIMIT_EXCEEDED", watch, used_micros="1000000"
        ):
            a.convert(ALICE, B, 2)  # the least that yields a point
        assert points(*watch) == [800, 59 + 39 + 99]


def test_net_debit_cap_and_headroom_from_receiving(net: Net) -> None:
    # B's cap is 0: it may convert only what it has been credited.
    a, b = net.pair(issued=1_000, src_cap=1_000_000, dst_cap=0)
    watch = [(a, ALICE), (b, ALICE_B)]
    open_route(b, a)

    a.convert(ALICE, B, 60)  # A's position: -600,000
    with refused(
        errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch, merchant_id=A,
        open_net_micros="-600000", net_debit_cap_micros="1000000",
    ):  # fmt: skip
        a.convert(ALICE, B, 50)
    a.convert(ALICE, B, 40)  # exactly -1,000,000
    with refused(errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch):
        a.convert(ALICE, B, 2)  # the least that yields a point
    assert points(*watch) == [900, 59 + 39]

    # A receives: B -> A credits A with dst_cash (not src_cash), which is A's new headroom.
    back = b.convert(ALICE_B, A, 30)
    assert_amounts(back, amounts(30, 10_000, 10_000, DEFAULT_FEE_BPS))
    assert back.dst_cash.micros == 290_000  # A's position: -710,000
    with refused(errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch):
        a.convert(ALICE, B, 30)
    a.convert(ALICE, B, 29)  # back to exactly -1,000,000
    with refused(errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch):
        a.convert(ALICE, B, 2)  # the least that yields a point

    # B's cap of 0 holds too: its position is 590,000 + 390,000 - 300,000 + 280,000 = 960,000.
    b.issue_points(ALICE_B, 100)
    with refused(
        errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch, merchant_id=B,
        open_net_micros="960000", net_debit_cap_micros="0",
    ):  # fmt: skip
        b.convert(ALICE_B, A, 97)
    b.convert(ALICE_B, A, 96)  # B: 0; A: -1,000,000 + 950,000 = -50,000
    with refused(errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch):
        a.convert(ALICE, B, 96)
    a.convert(ALICE, B, 95)  # exactly -1,000,000 again

    with net.hub.operator() as op:
        op.set_net_debit_cap(A, 1_100_000)  # raising the cap raises the headroom
    with refused(errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch):
        a.convert(ALICE, B, 11)
    a.convert(ALICE, B, 10)
    assert points(*watch) == [1_000 - 60 - 40 + 29 - 29 + 95 - 95 - 10, 59 + 39 - 30 + 28 + 100 - 96 + 94 + 9]


# --- quotes ---------------------------------------------------------------------------------------


def test_quote_by_source_points_converts_at_exactly_the_quoted_amounts(clocked: tuple[Net, ManualClock]) -> None:
    net, clock = clocked
    a, b = net.pair(src_value=10_007, dst_value=30_000, issued=2_000, fee_bps=250)
    want = amounts(1_234, 10_007, 30_000, 250)
    quote = a.quote_conversion(ALICE, B, src_points=1_234)
    assert_amounts(quote, want)
    assert (quote.source_merchant_id, quote.destination_merchant_id, quote.member_ref) == (A, B, ALICE)
    assert quote.expires_at.ToMilliseconds() == clock.now_ms() + QUOTE_TTL_MS
    assert points((a, ALICE), (b, ALICE_B)) == [2_000, 0], "a quote moves nothing"

    clock.advance(QUOTE_TTL_MS - 1)
    done = a.convert(ALICE, B, quote_id=quote.quote_id)
    assert_amounts(done, want)
    assert done.quote_id == quote.quote_id and done.created_at.ToMilliseconds() == clock.now_ms()
    assert a.get_conversion(done.conversion_id) == done

    # Stating src_points along with the quote is fine when they agree.
    again = a.quote_conversion(ALICE, B, src_points=100)
    assert a.convert(ALICE, B, 100, quote_id=again.quote_id).dst_points == again.dst_points
    assert points((a, ALICE), (b, ALICE_B)) == [2_000 - 1_234 - 100, 401 + again.dst_points]


def test_quote_by_destination_points_is_the_smallest_source_amount(net: Net) -> None:
    cases = [(10_007, 30_000, 250, 100), (10_000, 10_000, 100, 100), (30_000, 7, 333, 1_000_003), (1, 1_000, 0, 5)]
    for case, (src_value, dst_value, fee_bps, dst_points) in enumerate(cases):
        a, b = net.pair(
            src_value=src_value, dst_value=dst_value, issued=100_000, fee_bps=fee_bps, source=f"src-{case}",
            destination=f"dst-{case}",
        )  # fmt: skip
        quote = a.quote_conversion(ALICE, b.merchant_id, dst_points=dst_points)
        smallest = smallest_src_for(dst_points, src_value, dst_value, fee_bps)
        assert quote.src_points == smallest, f"case {case}"
        assert_amounts(quote, amounts(smallest, src_value, dst_value, fee_bps))
        assert quote.dst_points >= dst_points
        assert smallest == 1 or amounts(smallest - 1, src_value, dst_value, fee_bps).dst_points < dst_points

        done = a.convert(ALICE, b.merchant_id, quote_id=quote.quote_id)
        assert (done.src_points, done.dst_points) == (quote.src_points, quote.dst_points)
        assert points((a, ALICE), (b, ALICE_B)) == [100_000 - smallest, quote.dst_points]


def test_quote_expires_after_its_ttl(clocked: tuple[Net, ManualClock]) -> None:
    net, clock = clocked
    a, b = net.pair(issued=1_000)
    watch = [(a, ALICE), (b, ALICE_B)]
    start = clock.now_ms()
    live = a.quote_conversion(ALICE, B, src_points=100)
    stale = a.quote_conversion(ALICE, B, src_points=200)

    clock.advance(QUOTE_TTL_MS - 1)
    a.convert(ALICE, B, quote_id=live.quote_id)
    clock.advance(2)
    with refused(
        errors.QuoteExpired, FAILED_PRECONDITION, "QUOTE_EXPIRED", watch, quote_id=stale.quote_id,
        expired_at_ms=str(start + QUOTE_TTL_MS),
    ):  # fmt: skip
        a.convert(ALICE, B, quote_id=stale.quote_id)
    # Converting the same amount without the quote uses the values in force.
    a.convert(ALICE, B, 200)
    assert points(*watch) == [700, 99 + 198]


def test_quote_not_found_mismatch_and_single_use(net: Net) -> None:
    a, b = net.pair(issued=1_000)
    open_route(b, a)
    a.convert(ALICE, B, 200)
    c = net.merchant(C)
    net.member(c, ALICE_C)
    link(a, ALICE, c, ALICE_C)
    open_route(a, c)
    net.member(a, "bob", 1_000)
    net.member(b, "bob-b")
    link(a, "bob", b, "bob-b")
    watch = [(a, ALICE), (b, ALICE_B), (a, "bob")]
    quote = a.quote_conversion(ALICE, B, src_points=100)

    with refused(errors.QuoteNotFound, NOT_FOUND, "QUOTE_NOT_FOUND", watch):
        a.convert(ALICE, B, quote_id=str(uuid.uuid4()))
    with refused(errors.QuoteNotFound, NOT_FOUND, "QUOTE_NOT_FOUND", watch):
        b.convert(ALICE_B, A, quote_id=quote.quote_id)  # A's quote is not B's to spend
    with refused(errors.InvalidField, INVALID_ARGUMENT, "INVALID_FIELD", watch):
        a.convert(ALICE, B, quote_id="not-a-quote")

    with refused(errors.QuoteMismatch, FAILED_PRECONDITION, "QUOTE_MISMATCH", watch, fields="member_ref"):
        a.convert("bob", B, quote_id=quote.quote_id)
    with refused(errors.QuoteMismatch, FAILED_PRECONDITION, "QUOTE_MISMATCH", watch, fields="destination_merchant_id"):
        a.convert(ALICE, C, quote_id=quote.quote_id)
    with refused(errors.QuoteMismatch, FAILED_PRECONDITION, "QUOTE_MISMATCH", watch, fields="src_points"):
        a.convert(ALICE, B, 99, quote_id=quote.quote_id)

    # None of the refusals spent it; converting does, once.
    first = a.convert(ALICE, B, 100, quote_id=quote.quote_id)
    assert first.quote_id == quote.quote_id and first.dst_points == 99
    with refused(errors.QuoteAlreadyUsed, FAILED_PRECONDITION, "QUOTE_ALREADY_USED", watch, quote_id=quote.quote_id):
        a.convert(ALICE, B, quote_id=quote.quote_id)
    with refused(errors.QuoteAlreadyUsed, FAILED_PRECONDITION, "QUOTE_ALREADY_USED", watch):
        a.convert(ALICE, B, 100, quote_id=quote.quote_id)
    assert points(*watch) == [700, 198 + 99, 1_000]


def test_quote_keeps_its_values_across_a_scheduled_value_change(clocked: tuple[Net, ManualClock]) -> None:
    net, clock = clocked
    a, b = net.pair(src_value=10_000, dst_value=30_000, issued=10_000, fee_bps=250)
    start = clock.now_ms()
    scheduled = a.schedule_point_value(12_000, at(start + 10_000))  # the notice period is 10 s
    assert [v.value_micros for v in scheduled.scheduled_values] == [12_000]
    quote = a.quote_conversion(ALICE, B, src_points=1_000)
    assert_amounts(quote, amounts(1_000, 10_000, 30_000, 250))
    fee_quote = a.quote_conversion(ALICE, B, src_points=1_000)
    net.terms(A, B, fee_bps=500)  # the operator raises the fee: quotes keep theirs
    assert_amounts(a.convert(ALICE, B, quote_id=fee_quote.quote_id), amounts(1_000, 10_000, 30_000, 250))
    net.terms(A, B, fee_bps=250)

    clock.advance(10_000 - 1)
    before = a.convert(ALICE, B, 1_000)
    assert_amounts(before, amounts(1_000, 10_000, 30_000, 250))

    clock.advance(1)  # the new value is in force
    assert a.get_merchant().point_value.value_micros == 12_000
    quoted = a.convert(ALICE, B, quote_id=quote.quote_id)
    assert_amounts(quoted, amounts(1_000, 10_000, 30_000, 250))
    unquoted = a.convert(ALICE, B, 1_000)
    assert_amounts(unquoted, amounts(1_000, 12_000, 30_000, 250))
    assert_amounts(a.quote_conversion(ALICE, B, src_points=1_000), amounts(1_000, 12_000, 30_000, 250))
    assert points((a, ALICE), (b, ALICE_B)) == [6_000, 325 + 325 + 325 + 390]


# --- idempotency ----------------------------------------------------------------------------------


def test_same_request_id_is_one_conversion(net: Net) -> None:
    a, b = net.pair(src_value=10_007, dst_value=30_000, issued=1_000, fee_bps=250)
    request_id = str(uuid.uuid4())
    first = a.convert(ALICE, B, 500, request_id=request_id)
    after = [snapshot(a, ALICE), snapshot(b, ALICE_B)]
    second = a.convert(ALICE, B, 500, request_id=request_id)
    assert second == first
    assert [snapshot(a, ALICE), snapshot(b, ALICE_B)] == after
    assert after[0][0] == 500 and after[1][0] == amounts(500, 10_007, 30_000, 250).dst_points
    assert [i for i in after[0][1] if i == first.conversion_id] == [first.conversion_id], "posted once"

    # The same request_id for anything else is refused and changes nothing.
    watch = [(a, ALICE), (b, ALICE_B)]
    with refused(errors.RequestIdReused, ALREADY_EXISTS, "REQUEST_ID_REUSED", watch):
        a.convert(ALICE, B, 501, request_id=request_id)
    with refused(errors.RequestIdReused, ALREADY_EXISTS, "REQUEST_ID_REUSED", watch):
        a.convert(ALICE, B, 500, min_dst_points=1, request_id=request_id)
    with refused(errors.RequestIdReused, ALREADY_EXISTS, "REQUEST_ID_REUSED", watch):
        a.convert(ALICE, C, 500, request_id=request_id)
    with refused(errors.RequestIdReused, ALREADY_EXISTS, "REQUEST_ID_REUSED", watch):
        a.quote_conversion(ALICE, B, src_points=500, request_id=request_id)
    assert a.convert(ALICE, B, 500, request_id=request_id) == first


# --- ConvertBatch ---------------------------------------------------------------------------------


def test_convert_batch_mixed_items(net: Net) -> None:
    a, b = net.pair(src_value=10_007, dst_value=30_000, issued=1_000, fee_bps=250)
    net.member(a, "bob", 1_000)  # not linked at B
    watch = [(a, ALICE), (b, ALICE_B), (a, "bob")]
    items = [
        a.conversion_request(ALICE, B, 100),
        a.conversion_request(ALICE, B, 1_000_000),  # more than she holds
        a.conversion_request("bob", B, 10),  # not linked
        a.conversion_request(ALICE, B, 0),  # not an amount
        a.conversion_request(ALICE, B, 50),
        a.conversion_request(ALICE, B, 30, min_dst_points=1_000),
        a.conversion_request(ALICE, A, 10),  # to itself
        a.conversion_request(ALICE, B, 25),
        exchange_pb2.ConvertRequest(
            request_id=str(uuid.uuid4()), merchant_id=B, member_ref=ALICE_B, destination_merchant_id=A, src_points=5
        ),  # another merchant's member
    ]
    items.append(exchange_pb2.ConvertRequest())
    items[-1].CopyFrom(items[0])  # item 0 again, same request_id
    response = a.convert_batch(items)
    results = list(response.results)
    assert [r.index for r in results] == list(range(len(items)))
    good = {0: 100, 4: 50, 7: 25}
    for index, src_points in good.items():
        assert results[index].WhichOneof("outcome") == "conversion", f"item {index}: {results[index]}"
        conversion = results[index].conversion
        assert_amounts(conversion, amounts(src_points, 10_007, 30_000, 250))
        assert (conversion.src_member_ref, conversion.dst_member_ref) == (ALICE, "")
        assert a.get_conversion(conversion.conversion_id) == conversion
    assert_item_error(results[1], errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS")
    assert_item_error(results[2], errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED")
    assert_item_error(results[3], errors.InvalidAmount, INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert_item_error(results[5], errors.MinDstPointsNotMet, FAILED_PRECONDITION, "MIN_DST_POINTS_NOT_MET")
    assert_item_error(results[6], errors.SameMerchant, INVALID_ARGUMENT, "SAME_MERCHANT")
    assert_item_error(results[8], errors.CrossMerchantAccess, PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS")
    assert results[9].conversion == results[0].conversion, "a repeated request_id is the same conversion"
    ids = [results[i].conversion.conversion_id for i in good]
    assert ids == sorted(ids) and len(set(ids)) == 3, "applied in order, each once"

    dst_total = sum(amounts(p, 10_007, 30_000, 250).dst_points for p in good.values())
    assert points(*watch) == [1_000 - 175, dst_total, 1_000]
    after = snapshots(watch)

    # Item 0 retried on its own, as a unary Convert with the same request_id: the same conversion.
    retried = a.convert(ALICE, B, 100, request_id=items[0].request_id)
    assert retried == results[0].conversion
    assert a.convert(ALICE, B, 50, request_id=items[4].request_id.upper()) == results[4].conversion
    with refused(errors.RequestIdReused, ALREADY_EXISTS, "REQUEST_ID_REUSED", watch):
        a.convert(ALICE, B, 101, request_id=items[0].request_id)
    # A refused item retried on its own gets its stored refusal.
    with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS", watch):
        a.convert(ALICE, B, 1_000_000, request_id=items[1].request_id)
    # The whole batch retried: the same results, nothing posted again.
    assert a.convert_batch(items) == response
    assert snapshots(watch) == after


def raw_convert(target: str, client: MerchantClient, request: exchange_pb2.ConvertRequest) -> exchange_pb2.Conversion:
    """A unary Convert of exactly `request` (the SDK would fill in merchant_id), signed as `client`."""
    body = request.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        send = channel.unary_unary(CONVERT, request_serializer=None, response_deserializer=None)
        try:
            raw = send(body, metadata=tuple(client.signer.metadata(CONVERT, body)), timeout=20)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
    assert isinstance(raw, bytes)
    return exchange_pb2.Conversion.FromString(raw)


def test_retry_of_a_request_without_merchant_id_is_the_same_conversion(net: Net) -> None:
    a, b = net.pair(issued=1_000)
    watch = [(a, ALICE), (b, ALICE_B)]
    # merchant_id omitted: the caller (DESIGN §3: only the source converts, and the caller is the source).
    item = exchange_pb2.ConvertRequest(
        request_id=str(uuid.uuid4()), member_ref=ALICE, destination_merchant_id=B, src_points=100
    )
    result = a.convert_batch([item]).results[0]
    assert result.WhichOneof("outcome") == "conversion"
    after = snapshots(watch)
    assert raw_convert(net.hub.target, a, item) == result.conversion
    assert snapshots(watch) == after

    unary = exchange_pb2.ConvertRequest(
        request_id=str(uuid.uuid4()), member_ref=ALICE, destination_merchant_id=B, src_points=50
    )
    first = raw_convert(net.hub.target, a, unary)
    assert a.convert(ALICE, B, 50, request_id=unary.request_id) == first
    assert points(*watch) == [850, 99 + 49]


def test_convert_batch_size_limit(net: Net) -> None:
    a, b = net.pair(issued=1_000)
    watch = [(a, ALICE), (b, ALICE_B)]
    too_many = [a.conversion_request(ALICE, B, 1) for _ in range(1_001)]
    with refused(errors.BatchTooLarge, INVALID_ARGUMENT, "BATCH_TOO_LARGE", watch, max_items="1000"):
        a.convert_batch(too_many)
    # 1000 items are accepted (each refused on its own here: src_points 0 is no amount).
    full = a.convert_batch([a.conversion_request(ALICE, B, 0) for _ in range(1_000)])
    assert len(full.results) == 1_000
    assert_item_error(full.results[999], errors.InvalidAmount, INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert points(*watch) == [1_000, 0]


# --- reversal -------------------------------------------------------------------------------------


def test_reversal_restores_balances_exactly_and_only_once(net: Net) -> None:
    # A's net debit cap is exactly one conversion: the reversal must give the headroom back.
    a, b = net.pair(src_value=10_007, dst_value=30_000, issued=2_000, fee_bps=250, src_cap=12_348_638)
    watch = [(a, ALICE), (b, ALICE_B)]
    before = points(*watch)
    done = a.convert(ALICE, B, 1_234)
    assert points(*watch) == [2_000 - 1_234, 401]
    with refused(errors.NetDebitCapExceeded, FAILED_PRECONDITION, "NET_DEBIT_CAP_EXCEEDED", watch):
        a.convert(ALICE, B, 4)  # the least that yields a point here

    reversal_request = str(uuid.uuid4())
    with net.hub.operator() as op:
        reversal = op.reverse_conversion(done.conversion_id, reason="member complaint", request_id=reversal_request)
        assert op.reverse_conversion(done.conversion_id, reason="member complaint", request_id=reversal_request) == (
            reversal
        ), "a retried reversal is the same reversal, not ALREADY_REVERSED"
    assert reversal.conversion_id == done.conversion_id
    assert reversal.reversal_operation_id not in ("", done.conversion_id)
    assert points(*watch) == before

    for viewer in (a, b):
        seen = viewer.get_conversion(done.conversion_id)
        assert seen.status == REVERSED
        assert seen.reversal_operation_id == reversal.reversal_operation_id
        assert_amounts(seen, amounts(1_234, 10_007, 30_000, 250))
    out = next(a.iter_activity(ALICE))
    assert (out.operation_id, out.kind, out.points_delta) == (
        reversal.reversal_operation_id, ledger_pb2.ACTIVITY_KIND_REVERSAL, 1_234,
    )  # fmt: skip
    into = next(b.iter_activity(ALICE_B))
    assert (into.operation_id, into.kind, into.points_delta) == (
        reversal.reversal_operation_id, ledger_pb2.ACTIVITY_KIND_REVERSAL, -401,
    )  # fmt: skip

    with net.hub.operator() as op:
        with refused(
            errors.AlreadyReversed, FAILED_PRECONDITION, "ALREADY_REVERSED", watch, conversion_id=done.conversion_id
        ):
            op.reverse_conversion(done.conversion_id)
        with refused(errors.ConversionNotFound, NOT_FOUND, "CONVERSION_NOT_FOUND", watch):
            op.reverse_conversion("op_9999999999999999")

    # A's position is back to 0: the same conversion fits its cap again.
    again = a.convert(ALICE, B, 1_234)
    assert again.conversion_id != done.conversion_id
    assert points(*watch) == [2_000 - 1_234, 401]


def test_reversal_needs_the_points_still_held_and_the_window_open(clocked: tuple[Net, ManualClock]) -> None:
    net, clock = clocked  # reversal_window_s = 60
    a, b = net.pair(issued=1_000)
    watch = [(a, ALICE), (b, ALICE_B)]
    with net.hub.operator() as op:
        spent = a.convert(ALICE, B, 100)  # 99 points at B
        b.redeem_points(ALICE_B, 1)  # she spent one of them
        with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS", watch, balance="98"):
            op.reverse_conversion(spent.conversion_id)
        assert a.get_conversion(spent.conversion_id).status == COMPLETED
        b.issue_points(ALICE_B, 1)  # she holds 99 again
        op.reverse_conversion(spent.conversion_id)
        assert points(*watch) == [1_000, 0]
        assert b.get_conversion(spent.conversion_id).status == REVERSED

        early = a.convert(ALICE, B, 100)
        late = a.convert(ALICE, B, 200)
        clock.advance(59_000)
        op.reverse_conversion(early.conversion_id)
        clock.advance(2_000)
        with refused(
            errors.ReversalWindowClosed, FAILED_PRECONDITION, "REVERSAL_WINDOW_CLOSED", watch,
            conversion_id=late.conversion_id,
        ):  # fmt: skip
            op.reverse_conversion(late.conversion_id)
    assert a.get_conversion(late.conversion_id).status == COMPLETED
    assert points(*watch) == [800, 198]


# --- routes as the merchants see them -------------------------------------------------------------


def route_view(route: common_pb2.Route) -> tuple[object, ...]:
    return (
        route.source_merchant_id,
        route.destination_merchant_id,
        route.outbound_open,
        route.inbound_accepted,
        route.operator_closed,
        route.state,
        route.fee_bps,
        route.min_src_points,
        route.max_src_points,
        route.daily_member_cap.currency,
        route.daily_member_cap.micros,
    )


def test_list_routes_shows_both_sides_and_the_operator_terms(net: Net) -> None:
    a = net.merchant(A)
    b = net.merchant(B)
    c = net.merchant(C)
    assert a.list_routes() == []

    def views(client: MerchantClient) -> list[tuple[object, ...]]:
        return [route_view(r) for r in client.list_routes()]

    pending = (A, B, True, False, False, PENDING, DEFAULT_FEE_BPS, 0, 0, "CNY", 0)
    assert route_view(a.set_route(B, "outbound")) == pending
    assert views(a) == views(b) == [pending]
    assert views(c) == []

    opened = (A, B, True, True, False, OPEN, DEFAULT_FEE_BPS, 0, 0, "CNY", 0)
    assert route_view(b.set_route(A, "inbound")) == opened
    assert views(a) == views(b) == [opened]

    termed = (A, B, True, True, False, OPEN, 250, 10, 500, "CNY", 2_000_000)
    terms = {"fee_bps": 250, "min_src_points": 10, "max_src_points": 500, "daily_member_cap_micros": 2_000_000}
    assert route_view(net.terms(A, B, **terms)) == termed
    assert views(a) == views(b) == [termed]

    # B opens the other direction; the operator sets terms on a route nobody has agreed to yet.
    reverse = (B, A, True, False, False, PENDING, DEFAULT_FEE_BPS, 0, 0, "CNY", 0)
    b.set_route(A, "outbound")
    zero_fee = (A, C, False, False, False, PENDING, 0, 0, 0, "CNY", 0)
    assert route_view(net.terms(A, C, fee_bps=0)) == zero_fee
    assert views(a) == [termed, zero_fee, reverse]
    assert views(b) == [termed, reverse]
    assert views(c) == [zero_fee]

    closed = (A, B, True, True, True, CLOSED, 250, 10, 500, "CNY", 2_000_000)
    assert route_view(net.terms(A, B, closed=True, **terms)) == closed
    assert views(a)[0] == views(b)[0] == closed

    assert route_view(net.terms(A, B, **terms)) == termed
    withdrawn = (A, B, True, False, False, PENDING, 250, 10, 500, "CNY", 2_000_000)
    assert route_view(b.set_route(A, "inbound", enabled=False)) == withdrawn
    assert views(a)[0] == views(b)[0] == withdrawn
