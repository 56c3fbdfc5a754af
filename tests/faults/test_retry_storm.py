"""Retry storms (DESIGN §2 "Idempotency"), across every mutating request kind and concurrently.

tests/integration/test_idempotency.py proves it for IssuePoints one retry after another (and 16
twins at once), tests/integration/test_conversion_concurrency.py for Convert. Here every mutating
kind of every service — enrolment, points, link codes, routes, point values, keys, quotes,
conversions single and batched, reversals, merchant admission and status, route terms, caps,
cycles, statements, disputes, settlement — is sent 1 to 5 times at once under one request_id,
each copy on its own channel, all kinds of a phase released together (tests/faults/storm_cases.py):
every copy gets the same bytes (or the same refusal), the request applies once (its effect, its
audit record, its idempotency record), and a later retry changes nothing. On SQLite and
PostgreSQL in-process, and through `pointsx serve --workers 2`, where twins land in different
processes and meet only in the database.

And one request_id given at once to different requests of one merchant: exactly one of them
applies, its twins replay it, and every other is REQUEST_ID_REUSED.

Two storms of another sort, each of which stopped the hub's ledger writer when this suite was
written (both fixed by "Writer: never dies, drops writes whose callers gave up, …"):

- clients with deadlines too short for the hub (the SDK retries DEADLINE_EXCEEDED with the same
  request_id): a write whose caller has given up must still be answered by the writer, and the hub
  must go on writing — against a real `pointsx serve`, on both backends;
- a cycle closed again and again while issues and conversions commit (PostgreSQL): no deadlock
  between a batch and the close, and the writer survives any it meets.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from sqlalchemy import func, select

from exchange.config import load_key
from exchange.operator_client import OperatorClient
from exchange.store.schema import audit_log, members, operations
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import ledger_pb2
from merchant_sdk.signing import public_key_bytes
from tests.conftest import BACKENDS
from tests.faults.clients import AttemptCounter, CountingOperatorClient
from tests.faults.conftest import WorkersHub
from tests.faults.hubproc import HubProcess
from tests.faults.storm import Outcome, StormHub, fingerprint
from tests.faults.storm_cases import StormScenario
from tests.harness import RunningHub
from tests.integration.test_clearing_crash import new_data_dir
from tests.integration.test_conversion_concurrency import (
    BIG_CAP,
    Racing,
    admit,
    assert_no_deadlock,
    enroll_linked,
    open_route,
    spy_on_conflicts,
)
from tests.integration.test_idempotency import RawCaller

LEDGER = "/pointsx.v1.LedgerService/"


@pytest.mark.timeout(120)
def test_every_mutating_kind_applies_once_under_a_retry_storm(hub: RunningHub) -> None:
    storm_hub = StormHub(hub.target, hub.operator_key, hub.hub.engine)
    for rotation in (0, 3):  # between the two rounds every case is sent at least twice at once
        scenario = StormScenario(storm_hub, f"r{rotation}", rotation)
        problems = scenario.run()
        assert not problems, "\n".join(problems)
        assert scenario.cases_made == 26


@pytest.mark.timeout(120)
def test_retry_storms_through_two_worker_processes(workers_hub: WorkersHub) -> None:
    for rotation in (1, 4):
        scenario = StormScenario(workers_hub.storm_hub, f"w{rotation}", rotation)
        problems = scenario.run()
        assert not problems, "\n".join(problems)


def _race(calls: list[tuple[RawCaller, str, Message]]) -> list[Outcome]:
    barrier = threading.Barrier(len(calls))

    def send(call: tuple[RawCaller, str, Message]) -> Outcome:
        raw, method, request = call
        barrier.wait(20)
        try:
            return raw.call(method, request)
        except errors.PointsxError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(send, calls))


@pytest.mark.timeout(60)
def test_one_request_id_for_different_requests_at_once_applies_exactly_one(hub: RunningHub) -> None:
    client, key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 1_000)
    request_id = str(uuid.uuid4())
    contenders: list[tuple[str, Message]] = [
        ("IssuePoints", ledger_pb2.IssuePointsRequest(request_id=request_id, merchant_id="coffee",
                                                      member_ref="alice", points=7)),
        ("RedeemPoints", ledger_pb2.RedeemPointsRequest(request_id=request_id, merchant_id="coffee",
                                                        member_ref="alice", points=5)),
        ("EnrollMember", ledger_pb2.EnrollMemberRequest(request_id=request_id, merchant_id="coffee",
                                                        member_ref="bob")),
        ("CreateLinkCode", ledger_pb2.CreateLinkCodeRequest(request_id=request_id, merchant_id="coffee",
                                                            member_ref="alice")),
    ]  # fmt: skip
    copies = 3
    callers = [RawCaller(hub.target, "coffee", key) for _ in range(len(contenders) * copies)]
    try:
        calls = [(callers[i], LEDGER + contenders[i % len(contenders)][0], contenders[i % len(contenders)][1])
                 for i in range(len(callers))]  # fmt: skip
        outcomes = _race(calls)
    finally:
        for caller in callers:
            caller.close()
    winners = {contenders[i % len(contenders)][0] for i, o in enumerate(outcomes) if isinstance(o, bytes)}
    assert len(winners) == 1, f"more than one request applied under one request_id: {winners} / {outcomes}"
    (winner,) = winners
    won = [o for i, o in enumerate(outcomes) if contenders[i % len(contenders)][0] == winner]
    assert len({fingerprint(o) for o in won}) == 1 and len(won) == copies, "the winner's twins replay it"
    lost = [o for i, o in enumerate(outcomes) if contenders[i % len(contenders)][0] != winner]
    for error in lost:
        assert isinstance(error, errors.RequestIdReused), f"expected REQUEST_ID_REUSED, got {error!r}"
        assert error.code == grpc.StatusCode.ALREADY_EXISTS
    with hub.hub.engine.connect() as conn:
        audited = conn.execute(
            select(func.count()).select_from(audit_log).where(audit_log.c.request_id == request_id)
        ).scalar_one()
        applied = conn.execute(
            select(func.count()).select_from(operations).where(operations.c.request_id == request_id)
        ).scalar_one()
        bob = conn.execute(select(func.count()).select_from(members).where(members.c.member_ref == "bob")).scalar_one()
    assert audited == 1
    assert applied == (1 if winner in ("IssuePoints", "RedeemPoints") else 0)
    assert bob == (1 if winner == "EnrollMember" else 0)
    balance = client.get_balance("alice").points
    assert balance == 1_000 + {"IssuePoints": 7, "RedeemPoints": -5}.get(winner, 0)
    client.close()


@pytest.mark.timeout(120)
def test_clients_that_give_up_mid_write_leave_the_hub_writing(tmp_path: Path, database_url: str | None) -> None:
    """Regression: the writer answered a write whose asyncio wrapper had been cancelled (the caller's
    deadline passed while it was queued) with Future.set_result -> InvalidStateError, which killed
    the ledger-writer thread; every later write (and every authenticated call: nonces go through the
    writer) then waited forever while the health check still said SERVING."""
    data = new_data_dir(tmp_path)
    with HubProcess(data, database_url) as served:
        served.start()
        keys = admitted_over(served, "coffee")
        with MerchantClient(served.target, "coffee", keys["coffee"]) as setup:
            setup.enroll_member("alice")
        request_ids: list[str] = []
        lock = threading.Lock()

        def hurried(n: int) -> None:
            # The SDK's own retry, with deadlines the hub cannot meet: each attempt gives up early.
            with MerchantClient(served.target, "coffee", keys["coffee"], timeout_s=0.01, max_attempts=2) as client:
                for _ in range(10):
                    request_id = str(uuid.uuid4())
                    with lock:
                        request_ids.append(request_id)
                    with contextlib.suppress(errors.TransientError):
                        client.issue_points("alice", 1, request_id=request_id)

        threads = [threading.Thread(target=hurried, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        began = time.monotonic()
        with MerchantClient(served.target, "coffee", keys["coffee"], timeout_s=10, max_attempts=1) as patient:
            try:
                patient.issue_points("alice", 1_000)
            except errors.TransientError as exc:
                raise AssertionError(
                    f"the hub stopped writing after clients gave up ({exc}, {time.monotonic() - began:.1f} s):\n"
                    f"{served.output()}"
                ) from None
            for request_id in request_ids:  # each of the hurried writes, sent again, applies once
                patient.issue_points("alice", 1, request_id=request_id)
            assert patient.get_balance("alice").points == 1_000 + len(request_ids)
        assert served.stop() == 0, served.output()


def admitted_over(served: HubProcess, *merchant_ids: str) -> dict[str, Ed25519PrivateKey]:
    keys = {m: Ed25519PrivateKey.generate() for m in merchant_ids}
    with OperatorClient(served.target, load_key(served.data / "operator.key")) as op:
        for m, key in keys.items():
            op.register_merchant(m, m.title(), "CNY", 10_000, public_key_bytes(key.public_key()),
                                 net_debit_cap_micros=BIG_CAP)  # fmt: skip
    return keys


@pytest.mark.timeout(120)
@pytest.mark.skipif("postgres" not in BACKENDS, reason="PostgreSQL deselected by POINTSX_TEST_BACKENDS")
def test_cycles_closed_amid_issues_and_conversions_neither_deadlock_nor_stop_the_writer(
    postgres_hub: RunningHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (PostgreSQL): a batch whose first item appends to the audit log (audit_head FOR
    UPDATE) and whose later item converts (merchant_positions) deadlocks with a close, which updates
    merchant_positions and then appends to the audit log. The hub meant to retry such an item alone,
    but mutation.apply leaves its own savepoint open on a database error, so the writer's rollback of
    the item's savepoint warns "nested transaction already deassociated from connection" — with
    warnings as errors (this suite's setting) the warning escapes LedgerWriter._commit and kills the
    writer thread: the hub never writes again."""
    racing = Racing(postgres_hub, "postgres", 8, spy_on_conflicts(monkeypatch))
    shop, diner = admit(postgres_hub, "shop", BIG_CAP), admit(postgres_hub, "diner", BIG_CAP)
    open_route(shop, diner)
    for i in range(8):
        enroll_linked(shop, diner, f"m{i}", f"m{i}.d", 100_000)
    stop = threading.Event()
    failures: list[errors.PointsxError] = []
    written = [0]

    def write(i: int) -> None:
        with MerchantClient(postgres_hub.target, "shop", shop.key, timeout_s=10, max_attempts=1) as client:
            while not stop.is_set():
                try:
                    if i % 2:
                        client.convert(f"m{i}", "diner", 10)
                    else:
                        client.issue_points(f"m{i}", 10)
                    written[0] += 1
                except errors.PointsxError as exc:
                    failures.append(exc)
                    return

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        with CountingOperatorClient(postgres_hub.target, postgres_hub.operator_key, AttemptCounter(),
                                    max_attempts=1, timeout_s=10) as op:  # fmt: skip
            for _ in range(15):
                time.sleep(0.15)
                try:
                    op.close_cycle("CNY", timeout_s=10)
                except errors.TransientError as exc:
                    failures.append(exc)
                    break
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    deadlocks = racing.conflicts.count("40P01")
    assert not failures, f"the hub stopped answering ({deadlocks} deadlocks met before): {failures[:3]}"
    assert written[0] > 50
    assert_no_deadlock(racing)
