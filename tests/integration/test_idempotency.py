"""Idempotency over real gRPC (DESIGN §2 "Idempotency"): a retry with the same request_id and
content returns the stored outcome byte for byte and changes nothing; different content under the
same request_id is ALREADY_EXISTS / REQUEST_ID_REUSED; refusals are stored outcomes too.

Responses are compared as the raw bytes on the wire: the calls here bypass the SDK's parsing.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import ledger_pb2
from merchant_sdk.signing import Signer
from tests.auditor import check_invariants
from tests.harness import RunningHub

ISSUE = "/pointsx.v1.LedgerService/IssuePoints"
REDEEM = "/pointsx.v1.LedgerService/RedeemPoints"
THREADS = 16


class RawCaller:
    """Signs and sends serialised requests and returns the response bytes exactly as received."""

    def __init__(self, target: str, merchant_id: str, key: Ed25519PrivateKey) -> None:
        self.signer = Signer(merchant_id, key)
        self.channel = grpc.insecure_channel(target)

    def call(self, method: str, request: Message) -> bytes:
        body = request.SerializeToString()
        try:
            send = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            response = send(body, metadata=tuple(self.signer.metadata(method, body)), timeout=20)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
        assert isinstance(response, bytes)
        return response

    def close(self) -> None:
        self.channel.close()


@contextmanager
def raw_caller(hub: RunningHub, merchant_id: str, key: Ed25519PrivateKey) -> Iterator[RawCaller]:
    caller = RawCaller(hub.target, merchant_id, key)
    try:
        yield caller
    finally:
        caller.close()


@contextmanager
def refused(cls: type[errors.PointsxError], code: grpc.StatusCode, reason: str) -> Iterator[None]:
    """The block must fail with exactly `cls`, carrying `code` and the ErrorInfo `reason`."""
    with pytest.raises(errors.PointsxError) as info:
        yield
    error = info.value
    assert type(error) is cls, f"expected {cls.__name__}, got {type(error).__name__}: {error}"
    assert error.code == code, f"{reason}: expected {code}, got {error.code}"
    assert error.reason == reason


def issue_request(request_id: str, member_ref: str, points: int, memo: str = "") -> ledger_pb2.IssuePointsRequest:
    return ledger_pb2.IssuePointsRequest(
        request_id=request_id, merchant_id="coffee", member_ref=member_ref, points=points, memo=memo
    )


def activity_ids(client: MerchantClient, member_ref: str) -> list[str]:
    return [a.operation_id for a in client.iter_activity(member_ref)]


def test_replayed_issue_is_byte_identical_and_applies_once(hub: RunningHub) -> None:
    client, key = hub.admit("coffee")
    client.enroll_member("alice")
    request_id = str(uuid.uuid4())
    with raw_caller(hub, "coffee", key) as raw:
        first = raw.call(ISSUE, issue_request(request_id, "alice", 250, memo="order 17"))
        second = raw.call(ISSUE, issue_request(request_id, "alice", 250, memo="order 17"))
        assert first == second
        movement = ledger_pb2.PointsMovement.FromString(first)
        assert (movement.points, movement.balance_points) == (250, 250)
        assert client.get_balance("alice").points == 250
        assert activity_ids(client, "alice") == [movement.operation_id]

        # The state moves on; a late retry still gets the original answer and changes nothing.
        client.issue_points("alice", 5)
        late = raw.call(ISSUE, issue_request(request_id, "alice", 250, memo="order 17"))
        assert late == first
    again = client.issue_points("alice", 250, memo="order 17", request_id=request_id)
    assert again.operation_id == movement.operation_id and again.balance_points == 250
    assert client.get_balance("alice").points == 255
    assert len(activity_ids(client, "alice")) == 2


def test_same_request_id_with_different_content_is_request_id_reused(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.enroll_member("bob")
    request_id = str(uuid.uuid4())
    original = client.issue_points("alice", 100, request_id=request_id)
    before = (client.get_balance("alice").points, client.get_balance("bob").points, activity_ids(client, "alice"))

    with refused(errors.RequestIdReused, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        client.issue_points("alice", 101, request_id=request_id)
    with refused(errors.RequestIdReused, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        client.issue_points("alice", 100, memo="changed", request_id=request_id)
    with refused(errors.RequestIdReused, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        client.issue_points("bob", 100, request_id=request_id)
    with refused(errors.RequestIdReused, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        client.redeem_points("alice", 100, request_id=request_id)
    with refused(errors.RequestIdReused, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
        client.enroll_member("carol", request_id=request_id)

    assert (
        client.get_balance("alice").points,
        client.get_balance("bob").points,
        activity_ids(client, "alice"),
    ) == before
    # The original content still replays, and another merchant's request_ids are its own.
    assert client.issue_points("alice", 100, request_id=request_id) == original
    tea, _tea_key = hub.admit("tea")
    tea.enroll_member("alice")
    assert tea.issue_points("alice", 7, request_id=request_id).balance_points == 7
    assert client.get_balance("alice").points == 100


def test_refusal_is_replayed_even_after_the_member_can_afford_it(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 10)
    request_id = str(uuid.uuid4())

    with refused(errors.InsufficientPoints, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_POINTS"):
        client.redeem_points("alice", 50, request_id=request_id)
    with pytest.raises(errors.PointsxError) as first:
        client.redeem_points("alice", 50, request_id=request_id)

    client.issue_points("alice", 100)
    assert client.get_balance("alice").points == 110
    with refused(errors.InsufficientPoints, grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_POINTS"):
        client.redeem_points("alice", 50, request_id=request_id)
    with pytest.raises(errors.PointsxError) as later:
        client.redeem_points("alice", 50, request_id=request_id)
    assert later.value.message == first.value.message
    assert client.get_balance("alice").points == 110
    assert len(activity_ids(client, "alice")) == 2

    # A new request_id is a new request, and it goes through.
    assert client.redeem_points("alice", 50).balance_points == 60


def test_replayed_refusal_keeps_its_error_metadata(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 10)
    request_id = str(uuid.uuid4())
    with pytest.raises(errors.InsufficientPoints) as first:
        client.redeem_points("alice", 50, request_id=request_id)
    assert first.value.metadata == {"member_ref": "alice", "balance": "10"}
    with pytest.raises(errors.InsufficientPoints) as replay:
        client.redeem_points("alice", 50, request_id=request_id)
    assert replay.value.metadata == first.value.metadata


def _accepts(client: MerchantClient, member_ref: str, points: int, request_id: str) -> ledger_pb2.PointsMovement | None:
    """The movement, or None when the hub refuses a non-canonical request_id (also a valid fix)."""
    try:
        return client.issue_points(member_ref, points, request_id=request_id)
    except errors.InvalidRequestId:
        return None


def test_upper_case_request_id_keeps_the_ledger_consistent(tmp_path: Path, database_url: str | None) -> None:
    running = RunningHub(tmp_path, database_url)  # not the `hub` fixture: the auditor is the assertion here
    try:
        client, _key = running.admit("coffee")
        client.enroll_member("alice")
        request_id = str(uuid.uuid4()).upper()
        movement = _accepts(client, "alice", 5, request_id)
        if movement is not None:
            assert client.issue_points("alice", 5, request_id=request_id) == movement
            assert client.get_balance("alice").points == 5
        client.close()
        check_invariants(running.hub.engine)
    finally:
        running.stop()


def test_request_id_spellings_of_one_uuid_are_one_request(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    request_id = str(uuid.uuid4())
    movement = client.issue_points("alice", 5, request_id=request_id)
    retry = _accepts(client, "alice", 5, request_id.upper())  # the same UUID, the same request
    assert retry is None or retry == movement
    assert client.get_balance("alice").points == 5


def _race(work: Sequence[tuple[RawCaller, str, Message]]) -> list[bytes | errors.PointsxError]:
    """Send every request at once from its own thread; each outcome is response bytes or the refusal."""
    barrier = threading.Barrier(len(work))

    def send(item: tuple[RawCaller, str, Message]) -> bytes | errors.PointsxError:
        raw, method, request = item
        barrier.wait(timeout=20)
        try:
            return raw.call(method, request)
        except errors.PointsxError as exc:
            return exc

    with ThreadPoolExecutor(len(work)) as pool:
        return list(pool.map(send, work))


def test_concurrent_duplicates_apply_once(hub: RunningHub) -> None:
    client, key = hub.admit("coffee")
    client.enroll_member("alice")
    request_id = str(uuid.uuid4())
    with raw_caller(hub, "coffee", key) as raw:
        outcomes = _race([(raw, ISSUE, issue_request(request_id, "alice", 42))] * THREADS)
    responses = [o for o in outcomes if isinstance(o, bytes)]
    assert len(responses) == THREADS, f"duplicates refused: {[o for o in outcomes if not isinstance(o, bytes)][:3]}"
    assert len(set(responses)) == 1, "every duplicate gets the same bytes"
    movement = ledger_pb2.PointsMovement.FromString(responses[0])
    assert (movement.points, movement.balance_points) == (42, 42)
    assert client.get_balance("alice").points == 42
    assert activity_ids(client, "alice") == [movement.operation_id]


def test_concurrent_conflicting_requests_under_one_request_id(hub: RunningHub) -> None:
    client, key = hub.admit("coffee")
    client.enroll_member("alice")
    request_id = str(uuid.uuid4())
    with raw_caller(hub, "coffee", key) as raw:
        work = [(raw, ISSUE, issue_request(request_id, "alice", 10 + i % 2)) for i in range(THREADS)]
        outcomes = _race(work)
    won = [o for o in outcomes if isinstance(o, bytes)]
    lost = [o for o in outcomes if not isinstance(o, bytes)]
    assert won, "one of the two contents must win"
    assert len(set(won)) == 1
    movement = ledger_pb2.PointsMovement.FromString(won[0])
    assert movement.points in (10, 11)
    assert len(won) == THREADS // 2, "every twin of the winner replays it"
    assert all(isinstance(e, errors.RequestIdReused) and e.code == grpc.StatusCode.ALREADY_EXISTS for e in lost)
    assert client.get_balance("alice").points == movement.points
    assert activity_ids(client, "alice") == [movement.operation_id]
