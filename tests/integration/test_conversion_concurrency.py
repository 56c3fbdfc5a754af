"""Racing conversions (DESIGN §1-§4, §8): READ COMMITTED and guarded updates on PostgreSQL, one writer on SQLite.

Many threads, each with its own client and channel, released at once by a barrier:
- one member's conversions never overdraw it, and the destination gets exactly what was converted;
- a source merchant's conversions never take its open position below minus its net debit cap;
- conversions in opposite directions for one person neither deadlock nor fail;
- concurrent retries of one request_id post once and all answer the same;
- one quote is spent once, a member's daily cap holds, and one conversion is reversed once.

No scenario may meet a deadlock, not even one the hub would detect and quietly retry (a spy on the
mutation runner notes every database conflict).

Every scenario runs on PostgreSQL (32+ threads) and, smaller, on SQLite; the invariant auditor runs after each.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from exchange.ledger import positions
from exchange.operator_client import OperatorClient
from exchange.store import mutation
from exchange.store.schema import conversions, operations
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from tests.auditor import check_invariants
from tests.harness import RunningHub

T = TypeVar("T")
VALUE = 10_000  # micros per point, both merchants
FEE_BPS = 100  # the network default
BIG_CAP = 10**12


@dataclass(frozen=True)
class Racing:
    hub: RunningHub
    backend: str
    workers: int  # threads released at once
    conflicts: list[str]  # SQLSTATEs of database conflicts the hub met (and retried or not)


def spy_on_conflicts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Note every database conflict the hub's mutation runner sees (and may retry), by SQLSTATE."""
    seen: list[str] = []
    original = mutation.is_retryable

    def spy(exc: DBAPIError) -> bool:
        seen.append(str(getattr(exc.orig, "sqlstate", None) or exc.orig))
        return original(exc)

    monkeypatch.setattr(mutation, "is_retryable", spy)
    return seen


@pytest.fixture(params=["postgres", "sqlite"])
def racing(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Racing]:
    conflicts = spy_on_conflicts(monkeypatch)
    if request.param == "postgres":
        yield Racing(request.getfixturevalue("postgres_hub"), "postgres", 32, conflicts)  # the fixture audits
        return
    running = RunningHub(tmp_path, None)  # the data directory's SQLite file: one writer, a smaller run
    try:
        yield Racing(running, "sqlite", 12, conflicts)
        check_invariants(running.hub.engine)
    finally:
        running.stop()


@dataclass(frozen=True)
class Party:
    merchant_id: str
    key: Ed25519PrivateKey
    client: MerchantClient


@dataclass(frozen=True)
class Expected:
    """DESIGN §1 for `src_points` at equal point values and the default fee, worked out by hand."""

    src_points: int

    @property
    def src_cash(self) -> int:
        return self.src_points * VALUE

    @property
    def fee(self) -> int:
        return -(-self.src_cash * FEE_BPS // 10_000)

    @property
    def dst_points(self) -> int:
        return (self.src_cash - self.fee) // VALUE

    @property
    def dst_cash(self) -> int:
        return self.dst_points * VALUE


def admit(hub: RunningHub, merchant_id: str, cap_micros: int) -> Party:
    client, key = hub.admit(merchant_id, value_micros=VALUE, cap_micros=cap_micros)
    return Party(merchant_id, key, client)


def open_route(source: Party, destination: Party) -> None:
    source.client.set_route(destination.merchant_id, "outbound")
    destination.client.set_route(source.merchant_id, "inbound")


def enroll_linked(source: Party, destination: Party, src_ref: str, dst_ref: str, points: int) -> None:
    source.client.enroll_member(src_ref)
    destination.client.enroll_member(dst_ref)
    code = source.client.create_link_code(src_ref).code
    destination.client.redeem_link_code(dst_ref, code)
    if points:
        source.client.issue_points(src_ref, points)


def release(calls: list[Callable[[], T]]) -> list[T | errors.PointsxError]:
    """Each call on its own thread, all let go at once by a barrier; a refusal is an outcome."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T | errors.PointsxError:
        barrier.wait(timeout=30)
        try:
            return call()
        except errors.PointsxError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def race(hub: RunningHub, jobs: list[tuple[Party, Callable[[MerchantClient], T]]]) -> list[T | errors.PointsxError]:
    """Each job with its own client (its own channel), all released together."""
    clients = [MerchantClient(hub.target, party.merchant_id, party.key) for party, _ in jobs]
    try:
        return release([functools.partial(fn, client) for (_, fn), client in zip(jobs, clients, strict=True)])
    finally:
        for client in clients:
            client.close()


def operator_race(hub: RunningHub, workers: int, fn: Callable[[OperatorClient], T]) -> list[T | errors.PointsxError]:
    clients = [hub.operator() for _ in range(workers)]
    try:
        return release([functools.partial(fn, client) for client in clients])
    finally:
        for client in clients:
            client.close()


def split(
    outcomes: list[exchange_pb2.Conversion | errors.PointsxError],
) -> tuple[list[exchange_pb2.Conversion], list[errors.PointsxError]]:
    done = [o for o in outcomes if isinstance(o, exchange_pb2.Conversion)]
    refused = [o for o in outcomes if isinstance(o, errors.PointsxError)]
    assert len(done) + len(refused) == len(outcomes)
    return done, refused


def assert_all(refused: list[errors.PointsxError], cls: type[errors.PointsxError], reason: str) -> None:
    for error in refused:
        assert type(error) is cls, f"expected {cls.__name__}, got {error!r}"
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == reason, error


def assert_no_deadlock(racing: Racing) -> None:
    """Not even one the hub detected and quietly retried."""
    assert "40P01" not in racing.conflicts, f"deadlocks retried: {racing.conflicts}"


def position(hub: RunningHub, merchant_id: str) -> int:
    with hub.hub.engine.connect() as conn:
        return positions.of(conn, merchant_id)


# --- (1) one member, many conversions -----------------------------------------------------------


def test_racing_conversions_of_one_member_never_overdraw(racing: Racing) -> None:
    hub, workers = racing.hub, racing.workers
    shop, diner = admit(hub, "shop", BIG_CAP), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    balance, each = (1_000, 70) if racing.backend == "postgres" else (500, 70)
    enroll_linked(shop, diner, "alice", "alice.d", balance)
    expected = Expected(each)

    def job(index: int) -> Callable[[MerchantClient], exchange_pb2.Conversion]:
        return lambda c: c.convert("alice", "diner", each, request_id=f"00000000-0000-4000-8000-{index:012d}")

    outcomes = race(hub, [(shop, job(i)) for i in range(workers)])
    done, refused = split(outcomes)

    k = balance // each
    assert k < workers, "the scenario must run the member dry"
    assert len(done) == k, f"{len(done)} conversions of {each} went through on a balance of {balance}"
    assert_all(refused, errors.InsufficientPoints, "INSUFFICIENT_POINTS")
    assert len({c.conversion_id for c in done}) == k
    for conversion in done:
        assert (conversion.src_points, conversion.dst_points) == (each, expected.dst_points)
        assert conversion.src_cash.micros == expected.src_cash and conversion.dst_cash.micros == expected.dst_cash
        assert conversion.status == exchange_pb2.CONVERSION_STATUS_COMPLETED

    assert shop.client.get_balance("alice").points == balance - k * each
    assert diner.client.get_balance("alice.d").points == sum(c.dst_points for c in done) == k * expected.dst_points
    assert position(hub, "shop") == -k * expected.src_cash
    assert position(hub, "diner") == k * expected.dst_cash
    # Each conversion reads back as it was answered.
    for conversion in done:
        assert shop.client.get_conversion(conversion.conversion_id) == conversion
    assert_no_deadlock(racing)


# --- (2) one source merchant at its net debit cap ------------------------------------------------


def test_racing_conversions_never_pass_the_net_debit_cap(racing: Racing) -> None:
    hub = racing.hub
    postgres = racing.backend == "postgres"
    attempts, n_members, points = (40, 16, 100) if postgres else (racing.workers, 6, 100)
    cash = Expected(points).src_cash
    allowed = 10 if postgres else 4
    cap = allowed * cash + cash // 2  # room for `allowed` conversions and half of another
    shop, diner = admit(hub, "shop", cap), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    members = [f"m{i:02d}" for i in range(n_members)]
    for ref in members:
        enroll_linked(shop, diner, ref, f"{ref}.d", 10_000)

    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(position(hub, "shop"))

    def job(ref: str) -> Callable[[MerchantClient], exchange_pb2.Conversion]:
        return lambda client: client.convert(ref, "diner", points)

    sampler = threading.Thread(target=sample, name="position-sampler", daemon=True)
    sampler.start()
    try:
        outcomes = race(hub, [(shop, job(members[i % n_members])) for i in range(attempts)])
    finally:
        stop.set()
        sampler.join(10)
    done, refused = split(outcomes)

    assert len(done) == cap // cash == allowed, f"{len(done)} conversions of {cash} micros under a cap of {cap}"
    assert_all(refused, errors.NetDebitCapExceeded, "NET_DEBIT_CAP_EXCEEDED")
    for error in refused:
        assert error.metadata["net_debit_cap_micros"] == str(cap)
        assert -cap <= int(error.metadata["open_net_micros"]) <= 0, error.metadata
    assert sum(conv.src_cash.micros for conv in done) <= cap
    final = position(hub, "shop")
    assert final == -allowed * cash >= -cap
    assert samples, "the sampler read no positions"
    assert min(samples) >= -cap, f"the position went to {min(samples)}, past the cap of {cap}"
    assert position(hub, "diner") == allowed * Expected(points).dst_cash
    converted = sum(10_000 - shop.client.get_balance(ref).points for ref in members)
    assert converted == allowed * points
    assert_no_deadlock(racing)


# --- (3) opposite directions for one person ------------------------------------------------------


def test_opposite_direction_conversions_for_one_person_neither_deadlock_nor_fail(racing: Racing) -> None:
    hub, workers = racing.hub, racing.workers
    shop, diner = admit(hub, "shop", BIG_CAP), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    open_route(diner, shop)
    enroll_linked(shop, diner, "pat", "pat.d", 10_000)
    diner.client.issue_points("pat.d", 10_000)
    rounds, points = 4, 10
    expected = Expected(points)

    def job(ref: str, destination: str) -> Callable[[MerchantClient], list[exchange_pb2.Conversion]]:
        return lambda client: [client.convert(ref, destination, points) for _ in range(rounds)]

    jobs = [(shop, job("pat", "diner")) if i % 2 == 0 else (diner, job("pat.d", "shop")) for i in range(workers)]
    outcomes = race(hub, jobs)
    failures = [o for o in outcomes if isinstance(o, errors.PointsxError)]
    assert not failures, f"conversions failed: {failures[:3]}"

    per_side = workers // 2 * rounds
    made = [conv for o in outcomes if isinstance(o, list) for conv in o]
    assert len({conv.conversion_id for conv in made}) == 2 * per_side
    assert sum(conv.source_merchant_id == "shop" for conv in made) == per_side
    each_side = 10_000 - per_side * points + per_side * expected.dst_points
    assert shop.client.get_balance("pat").points == each_side
    assert diner.client.get_balance("pat.d").points == each_side
    net = per_side * (expected.dst_cash - expected.src_cash)
    assert position(hub, "shop") == position(hub, "diner") == net
    # Not even a deadlock the hub detected and quietly retried: locks are taken in one order.
    assert_no_deadlock(racing)


# --- (4) concurrent retries of one request ------------------------------------------------------


def test_concurrent_retries_of_one_request_post_once(racing: Racing) -> None:
    hub, workers = racing.hub, racing.workers
    shop, diner = admit(hub, "shop", BIG_CAP), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    enroll_linked(shop, diner, "alice", "alice.d", 1_000)
    request_id = "5f0c6f1e-3c55-4e8e-9a43-2d7c1b9f0a11"
    expected = Expected(100)

    outcomes = race(hub, [(shop, lambda c: c.convert("alice", "diner", 100, request_id=request_id))] * workers)
    done, refused = split(outcomes)
    assert not refused, f"retries refused: {refused[:3]}"
    assert len({conv.SerializeToString() for conv in done}) == 1, "every retry answers the same bytes"
    conversion = done[0]
    assert (conversion.src_points, conversion.dst_points) == (100, expected.dst_points)
    assert shop.client.get_balance("alice").points == 900
    assert diner.client.get_balance("alice.d").points == expected.dst_points
    with hub.hub.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(conversions)).scalar_one() == 1
        stored = conn.execute(
            select(func.count()).select_from(operations).where(operations.c.request_id == request_id)
        ).scalar_one()
        assert stored == 1
    assert position(hub, "shop") == -expected.src_cash
    assert shop.client.convert("alice", "diner", 100, request_id=request_id) == conversion, "a later retry too"

    # The same request_id for a different conversion is refused, and changes nothing.
    with pytest.raises(errors.RequestIdReused) as reused:
        shop.client.convert("alice", "diner", 200, request_id=request_id)
    assert reused.value.code == grpc.StatusCode.ALREADY_EXISTS and reused.value.reason == "REQUEST_ID_REUSED"

    # Racing retries of a refused request: each gets the same refusal, and nothing posts.
    refused_id = "0b7e2a8c-1d4f-4c3b-8e6a-9f5d2c1b0a99"
    outcomes = race(hub, [(shop, lambda c: c.convert("alice", "diner", 5_000, request_id=refused_id))] * workers)
    done, refused = split(outcomes)
    assert not done and len(refused) == workers
    assert_all(refused, errors.InsufficientPoints, "INSUFFICIENT_POINTS")
    assert len({(e.message, tuple(sorted(e.metadata.items()))) for e in refused}) == 1, "one stored refusal"
    assert shop.client.get_balance("alice").points == 900
    assert position(hub, "shop") == -expected.src_cash
    assert_no_deadlock(racing)


# --- (5) one quote, many conversions; (6) one member at the route's daily cap; (7) one reversal ----


def test_racing_conversions_spend_one_quote_once(racing: Racing) -> None:
    """Every loser hears QUOTE_ALREADY_USED. (Regression: on PostgreSQL, with quotes.redeem() reading the quote
    unlocked, a loser got past it, inserted its conversion row and hit uq_conversions_quote_id before
    quotes.mark_used() could refuse it: the IntegrityError surfaced as INTERNAL, with no stored outcome.)"""
    hub, workers = racing.hub, racing.workers
    shop, diner = admit(hub, "shop", BIG_CAP), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    enroll_linked(shop, diner, "alice", "alice.d", 1_000)
    quote = shop.client.quote_conversion("alice", "diner", src_points=100)

    outcomes = race(hub, [(shop, lambda c: c.convert("alice", "diner", quote_id=quote.quote_id))] * workers)
    done, refused = split(outcomes)
    assert len(done) == 1, f"a quote was spent {len(done)} times"
    assert done[0].quote_id == quote.quote_id and done[0].dst_points == Expected(100).dst_points
    assert shop.client.get_balance("alice").points == 900
    assert diner.client.get_balance("alice.d").points == Expected(100).dst_points
    assert_no_deadlock(racing)
    assert_all(refused, errors.QuoteAlreadyUsed, "QUOTE_ALREADY_USED")


def test_racing_conversions_of_one_member_stay_under_the_daily_cap(racing: Racing) -> None:
    hub, workers = racing.hub, racing.workers
    shop, diner = admit(hub, "shop", BIG_CAP), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    cash = Expected(100).src_cash
    allowed = workers // 4
    daily_cap = allowed * cash + cash // 2
    with hub.operator() as op:
        op.set_route_terms("shop", "diner", daily_member_cap_micros=daily_cap)
    enroll_linked(shop, diner, "alice", "alice.d", 100 * workers)
    enroll_linked(shop, diner, "bob", "bob.d", 100 * workers)  # the cap is per member: bob is not held back

    jobs = [(shop, lambda c: c.convert("alice", "diner", 100))] * workers
    jobs += [(shop, lambda c: c.convert("bob", "diner", 100))] * allowed
    outcomes = race(hub, jobs)
    alice, bob = split(outcomes[:workers]), split(outcomes[workers:])
    assert len(alice[0]) == allowed, f"{len(alice[0])} of alice's conversions under a cap for {allowed}"
    assert_all(alice[1], errors.DailyLimitExceeded, "DAILY_LIMIT_EXCEEDED")
    assert len(bob[0]) == allowed and not bob[1], bob[1][:3]
    assert shop.client.get_balance("alice").points == 100 * workers - 100 * allowed
    assert_no_deadlock(racing)


def test_racing_reversals_of_one_conversion_reverse_it_once(racing: Racing) -> None:
    """Every loser hears ALREADY_REVERSED. (Regression: on PostgreSQL, with reverse() reading the conversion
    unlocked and guarding its status only at the end, a loser blocked on the destination member's row and,
    the points gone, was refused INSUFFICIENT_POINTS instead — the reason hanging on an unrelated balance.)"""
    hub, workers = racing.hub, racing.workers
    shop, diner = admit(hub, "shop", BIG_CAP), admit(hub, "diner", BIG_CAP)
    open_route(shop, diner)
    enroll_linked(shop, diner, "alice", "alice.d", 1_000)
    conversion = shop.client.convert("alice", "diner", 100)

    outcomes = operator_race(hub, workers, lambda op: op.reverse_conversion(conversion.conversion_id))
    reversed_ = [o for o in outcomes if not isinstance(o, errors.PointsxError)]
    refused = [o for o in outcomes if isinstance(o, errors.PointsxError)]
    assert len(reversed_) == 1, f"reversed {len(reversed_)} times"
    assert not [e for e in refused if isinstance(e, errors.InternalError)], refused[:3]
    assert shop.client.get_balance("alice").points == 1_000
    assert diner.client.get_balance("alice.d").points == 0
    after = shop.client.get_conversion(conversion.conversion_id)
    assert after.status == exchange_pb2.CONVERSION_STATUS_REVERSED
    assert after.reversal_operation_id == reversed_[0].reversal_operation_id
    assert position(hub, "shop") == position(hub, "diner") == 0
    assert_no_deadlock(racing)
    assert_all(refused, errors.AlreadyReversed, "ALREADY_REVERSED")
