"""Concurrent writers on PostgreSQL (several ledger-writer threads, READ COMMITTED, guarded updates;
DESIGN §2 and §8): a member is never overdrawn and no concurrent credit is lost."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import ledger_pb2
from tests.harness import RunningHub

T = TypeVar("T")
WORKERS = 32


def race(
    hub: RunningHub, merchant_id: str, key: Ed25519PrivateKey, jobs: list[Callable[[MerchantClient], T]]
) -> list[T | errors.PointsxError]:
    """Run each job on its own thread with its own client (its own channel), all released at once."""
    clients = [MerchantClient(hub.target, merchant_id, key) for _ in jobs]
    barrier = threading.Barrier(len(jobs))

    def run(index: int) -> T | errors.PointsxError:
        barrier.wait(timeout=30)
        try:
            return jobs[index](clients[index])
        except errors.PointsxError as exc:
            return exc

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(run, range(len(jobs))))
    finally:
        for client in clients:
            client.close()


def test_concurrent_redeems_never_overdraw(postgres_hub: RunningHub) -> None:
    client, key = postgres_hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 205)

    def redeem(c: MerchantClient) -> ledger_pb2.PointsMovement:
        return c.redeem_points("alice", 10)

    outcomes = race(postgres_hub, "coffee", key, [redeem] * WORKERS)
    succeeded = [o for o in outcomes if isinstance(o, ledger_pb2.PointsMovement)]
    refused = [o for o in outcomes if not isinstance(o, ledger_pb2.PointsMovement)]

    assert len(succeeded) == 20
    assert len(refused) == WORKERS - 20
    for error in refused:
        assert isinstance(error, errors.InsufficientPoints), f"unexpected refusal {error!r}"
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "INSUFFICIENT_POINTS"
    # Each success saw its own balance right after it: 195, 185, ... 5, each once, none negative.
    assert sorted(m.balance_points for m in succeeded) == list(range(5, 200, 10))
    assert len({m.operation_id for m in succeeded}) == 20
    assert client.get_balance("alice").points == 5

    activity = list(client.iter_activity("alice"))
    assert sorted(a.points_delta for a in activity) == [-10] * 20 + [205]
    assert {a.operation_id for a in activity if a.points_delta < 0} == {m.operation_id for m in succeeded}


def test_concurrent_issues_are_all_counted(postgres_hub: RunningHub) -> None:
    client, key = postgres_hub.admit("coffee")
    client.enroll_member("alice")
    amounts = list(range(1, WORKERS + 1))

    def issuer(points: int) -> Callable[[MerchantClient], ledger_pb2.PointsMovement]:
        return lambda c: c.issue_points("alice", points)

    outcomes = race(postgres_hub, "coffee", key, [issuer(n) for n in amounts])
    failures = [o for o in outcomes if not isinstance(o, ledger_pb2.PointsMovement)]
    assert not failures, f"issues refused: {failures[:3]}"
    movements = [o for o in outcomes if isinstance(o, ledger_pb2.PointsMovement)]

    total = sum(amounts)
    assert client.get_balance("alice").points == total
    assert max(m.balance_points for m in movements) == total
    assert len({m.balance_points for m in movements}) == WORKERS, "every credit saw a distinct balance"
    assert len({m.operation_id for m in movements}) == WORKERS
    assert sorted(a.points_delta for a in client.iter_activity("alice")) == amounts


def test_concurrent_issues_and_redeems_balance_exactly(postgres_hub: RunningHub) -> None:
    client, key = postgres_hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 100)

    jobs: list[Callable[[MerchantClient], ledger_pb2.PointsMovement]] = []
    for i in range(WORKERS):
        if i % 2:
            jobs.append(lambda c: c.issue_points("alice", 7))
        else:
            jobs.append(lambda c: c.redeem_points("alice", 9))
    outcomes = race(postgres_hub, "coffee", key, jobs)
    issued = sum(o.points for o in outcomes if isinstance(o, ledger_pb2.PointsMovement) and o.points == 7)
    redeemed = sum(o.points for o in outcomes if isinstance(o, ledger_pb2.PointsMovement) and o.points == 9)
    refusals = [o for o in outcomes if not isinstance(o, ledger_pb2.PointsMovement)]
    assert all(isinstance(e, errors.InsufficientPoints) for e in refusals), refusals[:3]
    assert issued == 7 * (WORKERS // 2), "issues are never refused"
    assert client.get_balance("alice").points == 100 + issued - redeemed
    assert all(o.balance_points >= 0 for o in outcomes if isinstance(o, ledger_pb2.PointsMovement))
