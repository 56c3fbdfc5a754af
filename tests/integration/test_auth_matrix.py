"""The authentication and authorisation matrix of DESIGN §6, over real gRPC with hand-made requests.

Every refusal is checked for its status code, its ErrorInfo reason, and for changing nothing: the
member's balance and activity, read afterwards through a properly signed client, are as before.
Bad requests are built on a raw channel (pre-serialised bytes, hand-made metadata) so each header
and each byte can be wrong on purpose.
"""

from __future__ import annotations

import base64
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from exchange.domain.clock import ManualClock
from exchange.store import nonces
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import (
    clearing_pb2,
    common_pb2,
    exchange_pb2,
    ledger_pb2,
    merchant_pb2,
    network_pb2,
    operator_pb2,
)
from merchant_sdk.signing import (
    HEADER_CALLER,
    HEADER_KEY_ID,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    Signer,
    auth_payload,
    key_id_of,
    public_key_bytes,
)
from merchant_sdk.transport import SignedTransport
from tests.auditor import check_invariants
from tests.harness import RunningHub

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT

LEDGER = "/pointsx.v1.LedgerService/"
ISSUE = LEDGER + "IssuePoints"
CONVERT = "/pointsx.v1.ExchangeService/Convert"
REDEEM = LEDGER + "RedeemPoints"
GET_BALANCE = LEDGER + "GetBalance"
NETWORK_INFO = "/pointsx.v1.NetworkService/GetNetworkInfo"
REGISTER_MERCHANT = "/pointsx.v1.OperatorService/RegisterMerchant"
LIST_MERCHANTS = "/pointsx.v1.OperatorService/ListMerchants"
A, B = "shop-a", "shop-b"  # merchant A and merchant B
WINDOW_MS = 300_000
SECOND_MS = 1_000

Metadata = list[tuple[str, str]]
Snapshot = tuple[int, list[str]]
RawCall = Callable[[str, bytes, Sequence[tuple[str, str]]], bytes]


# --- helpers --------------------------------------------------------------------------------------


@contextmanager
def refused(code: grpc.StatusCode, reason: str, case: str = "") -> Iterator[None]:
    """The block must fail with the SDK class for `reason`, carrying `code` and that ErrorInfo reason."""
    where = f"[{case}] " if case else ""
    with pytest.raises(errors.PointsxError) as info:
        yield
    error = info.value
    assert error.code == code, f"{where}{reason}: expected {code}, got {error.code} ({error})"
    assert error.reason == reason, f"{where}expected {reason}, got {error.reason!r} ({error})"
    assert type(error) is errors.REASONS[reason], (
        f"{where}expected {errors.REASONS[reason].__name__}, got {type(error)}"
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sign(
    method: str,
    body: bytes,
    caller: str,
    private_key: Ed25519PrivateKey,
    *,
    key_id: str | None = None,
    timestamp_ms: int | None = None,
    nonce: str | None = None,
) -> Metadata:
    """DESIGN §6 metadata, with every part choosable: `key_id` defaults to the signing key's own."""
    key_id = key_id or key_id_of(public_key_bytes(private_key.public_key()))
    timestamp = str(now_ms() if timestamp_ms is None else timestamp_ms)
    nonce = nonce or secrets.token_hex(16)
    signature = private_key.sign(auth_payload(method, caller, key_id, timestamp, nonce, body))
    return [
        (HEADER_CALLER, caller),
        (HEADER_KEY_ID, key_id),
        (HEADER_TIMESTAMP, timestamp),
        (HEADER_NONCE, nonce),
        (HEADER_SIGNATURE, base64.b64encode(signature).decode()),
    ]


def replaced(metadata: Metadata, header: str, value: str) -> Metadata:
    assert any(name == header for name, _ in metadata)
    return [(name, value if name == header else old) for name, old in metadata]


def without(metadata: Metadata, header: str) -> Metadata:
    return [(name, value) for name, value in metadata if name != header]


def issue_body(member_ref: str, points: int, *, merchant_id: str = A, request_id: str | None = None) -> bytes:
    return ledger_pb2.IssuePointsRequest(
        request_id=request_id or new_id(), merchant_id=merchant_id, member_ref=member_ref, points=points
    ).SerializeToString()


def new_id() -> str:
    return str(uuid.uuid4())


def snapshot(client: MerchantClient, member_ref: str) -> Snapshot:
    """A member's balance and every operation id of its activity, newest first."""
    return client.get_balance(member_ref).points, [a.operation_id for a in client.iter_activity(member_ref)]


@contextmanager
def raw_caller(target: str) -> Iterator[RawCall]:
    """Send pre-serialised bytes with exactly the given metadata; a failure becomes the SDK's typed error."""
    channel = grpc.insecure_channel(target)

    def call(method: str, body: bytes, metadata: Sequence[tuple[str, str]]) -> bytes:
        callable_ = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            response: bytes = callable_(body, metadata=tuple(metadata), timeout=10)
        except grpc.RpcError as exc:
            raise errors.from_rpc_error(exc) from None
        return response

    try:
        yield call
    finally:
        channel.close()


@pytest.fixture
def raw(hub: RunningHub) -> Iterator[RawCall]:
    with raw_caller(hub.target) as call:
        yield call


@pytest.fixture
def clocked_hub(tmp_path: Path, database_url: str | None) -> Iterator[tuple[RunningHub, ManualClock]]:
    """A hub on a frozen clock (started at the wall clock, so the SDK's own signatures still pass)."""
    clock = ManualClock(now_ms())
    running = RunningHub(tmp_path, database_url, clock=clock)
    try:
        yield running, clock
        check_invariants(running.hub.engine)
    finally:
        running.stop()


def merchant_with_member(hub: RunningHub, merchant_id: str = A) -> tuple[MerchantClient, Ed25519PrivateKey]:
    """A merchant whose member "alice" holds 100 points from one issue."""
    client, key = hub.admit(merchant_id)
    client.enroll_member("alice")
    client.issue_points("alice", 100)
    return client, key


# --- missing and malformed credentials ------------------------------------------------------------


def test_unsigned_call_is_missing_credentials(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    body = issue_body("alice", 50)

    with refused(UNAUTHENTICATED, "MISSING_CREDENTIALS"):
        raw(ISSUE, body, [])
    # Any one header missing is as good as none.
    for header in (HEADER_CALLER, HEADER_KEY_ID, HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE):
        with refused(UNAUTHENTICATED, "MISSING_CREDENTIALS", f"without {header}"):
            raw(ISSUE, body, without(sign(ISSUE, body, A, key), header))

    assert snapshot(client, "alice") == before


def test_every_signed_method_refuses_an_unsigned_call(raw: RawCall) -> None:
    """Every unary method outside NetworkService wants credentials before anything else, served
    yet or not: an anonymous caller learns nothing about what this hub version implements."""
    signed = [
        service
        for file in (merchant_pb2, ledger_pb2, exchange_pb2, clearing_pb2, operator_pb2)
        for service in file.DESCRIPTOR.services_by_name.values()
    ]
    methods = [f"/{s.full_name}/{m.name}" for s in signed for m in s.methods if not m.server_streaming]
    assert len(methods) >= 30, methods
    for method in methods:
        with refused(UNAUTHENTICATED, "MISSING_CREDENTIALS", method):
            raw(method, b"", [])


def test_malformed_metadata_is_malformed_credentials(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    body = issue_body("alice", 50)
    good_signature = dict(sign(ISSUE, body, A, key))[HEADER_SIGNATURE]
    cases: list[tuple[str, str, str]] = [
        ("nonce in upper case", HEADER_NONCE, secrets.token_hex(16).upper()),
        ("nonce too short", HEADER_NONCE, secrets.token_hex(15)),
        ("nonce too long", HEADER_NONCE, secrets.token_hex(17)),
        ("nonce not hex", HEADER_NONCE, "z" * 32),
        ("key id not hex", HEADER_KEY_ID, "g" * 16),
        ("key id too long", HEADER_KEY_ID, "0" * 17),
        ("timestamp not decimal", HEADER_TIMESTAMP, "1e12"),
        ("timestamp negative", HEADER_TIMESTAMP, f"-{now_ms()}"),
        ("timestamp empty", HEADER_TIMESTAMP, ""),
        ("caller empty", HEADER_CALLER, ""),
        ("caller too long", HEADER_CALLER, "x" * 64),
        ("signature not base64", HEADER_SIGNATURE, "not*base64!" * 8),
        ("signature url-safe base64", HEADER_SIGNATURE, base64.urlsafe_b64encode(b"\xfb\xff" * 32).decode()),
        ("signature unpadded", HEADER_SIGNATURE, good_signature.rstrip("=")),
        ("signature 63 bytes", HEADER_SIGNATURE, base64.b64encode(base64.b64decode(good_signature)[:63]).decode()),
        ("signature 65 bytes", HEADER_SIGNATURE, base64.b64encode(base64.b64decode(good_signature) + b"\0").decode()),
        ("signature empty", HEADER_SIGNATURE, ""),
    ]
    for label, header, value in cases:
        metadata = replaced(sign(ISSUE, body, A, key), header, value)
        with refused(UNAUTHENTICATED, "MALFORMED_CREDENTIALS", label):
            raw(ISSUE, body, metadata)

    assert snapshot(client, "alice") == before


# --- keys -----------------------------------------------------------------------------------------


def test_unregistered_key_and_another_callers_key_are_unknown(hub: RunningHub, raw: RawCall) -> None:
    client_a, key_a = merchant_with_member(hub, A)
    client_b, _key_b = merchant_with_member(hub, B)
    before_a, before_b = snapshot(client_a, "alice"), snapshot(client_b, "alice")

    stranger = Ed25519PrivateKey.generate()
    body = issue_body("alice", 50)
    with refused(UNAUTHENTICATED, "UNKNOWN_KEY"):
        raw(ISSUE, body, sign(ISSUE, body, A, stranger))

    # A's own key, correctly signed, but presented as caller B: the key is not B's.
    body_b = issue_body("alice", 50, merchant_id=B)
    with refused(UNAUTHENTICATED, "UNKNOWN_KEY"):
        raw(ISSUE, body_b, sign(ISSUE, body_b, B, key_a))
    # …and as the operator.
    with refused(UNAUTHENTICATED, "UNKNOWN_KEY"):
        raw(ISSUE, body, sign(ISSUE, body, "operator", key_a))
    # The operator's key presented as merchant A.
    with refused(UNAUTHENTICATED, "UNKNOWN_KEY"):
        raw(ISSUE, body, sign(ISSUE, body, A, hub.operator_key))

    assert snapshot(client_a, "alice") == before_a
    assert snapshot(client_b, "alice") == before_b


def test_signature_by_another_private_key_is_bad_signature(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    body = issue_body("alice", 50)

    impostor = Ed25519PrivateKey.generate()
    metadata = sign(ISSUE, body, A, impostor, key_id=client.key_id)
    with refused(UNAUTHENTICATED, "BAD_SIGNATURE"):
        raw(ISSUE, body, metadata)
    # A well-formed 64-byte signature of zeros does not pass either.
    zeros = replaced(sign(ISSUE, body, A, key), HEADER_SIGNATURE, base64.b64encode(bytes(64)).decode())
    with refused(UNAUTHENTICATED, "BAD_SIGNATURE"):
        raw(ISSUE, body, zeros)

    assert snapshot(client, "alice") == before


def test_tampered_body_is_bad_signature_and_issues_nothing(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    request_id = new_id()
    signed_body = issue_body("alice", 50, request_id=request_id)
    sent_body = issue_body("alice", 1_000_000, request_id=request_id)
    metadata = sign(ISSUE, signed_body, A, key)

    with refused(UNAUTHENTICATED, "BAD_SIGNATURE"):
        raw(ISSUE, sent_body, metadata)
    # One extra byte (an unknown field appended) is tampering too: the hub hashes the bytes as received.
    with refused(UNAUTHENTICATED, "BAD_SIGNATURE"):
        raw(ISSUE, signed_body + b"\x30\x01", metadata)
    assert snapshot(client, "alice") == before

    # The refusals did not burn the nonce (checked last): the genuine request still goes through, once.
    movement = ledger_pb2.PointsMovement.FromString(raw(ISSUE, signed_body, metadata))
    assert (movement.points, movement.balance_points) == (50, 150)
    balance, activity = snapshot(client, "alice")
    assert balance == 150
    assert activity == [movement.operation_id, *before[1]]


def test_signature_over_another_method_is_bad_signature(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    # Issue and redeem requests share one layout, so these bytes are a valid redeem body as well.
    body = ledger_pb2.RedeemPointsRequest(
        request_id=new_id(), merchant_id=A, member_ref="alice", points=40
    ).SerializeToString()
    signed_for_redeem = sign(REDEEM, body, A, key)

    with refused(UNAUTHENTICATED, "BAD_SIGNATURE"):
        raw(ISSUE, body, signed_for_redeem)
    # Same method name, another service's path.
    with refused(UNAUTHENTICATED, "BAD_SIGNATURE"):
        raw(ISSUE, body, sign("/pointsx.v2.LedgerService/IssuePoints", body, A, key))

    assert snapshot(client, "alice") == before


# --- timestamps and nonces ------------------------------------------------------------------------


def test_timestamp_outside_the_window_is_refused(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")

    for offset_ms in (-WINDOW_MS - SECOND_MS, WINDOW_MS + SECOND_MS, -10 * WINDOW_MS, 10 * WINDOW_MS):
        body = issue_body("alice", 50)
        metadata = sign(ISSUE, body, A, key, timestamp_ms=now_ms() + offset_ms)
        with refused(UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW", f"offset {offset_ms} ms"):
            raw(ISSUE, body, metadata)
    body = issue_body("alice", 50)
    with refused(UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW", "timestamp 0"):
        raw(ISSUE, body, sign(ISSUE, body, A, key, timestamp_ms=0))
    assert snapshot(client, "alice") == before

    # 200 s off either way is inside the window.
    balance = before[0]
    for offset_ms in (-200 * SECOND_MS, 200 * SECOND_MS):
        body = issue_body("alice", 7)
        movement = ledger_pb2.PointsMovement.FromString(
            raw(ISSUE, body, sign(ISSUE, body, A, key, timestamp_ms=now_ms() + offset_ms))
        )
        balance += 7
        assert movement.balance_points == balance
    assert client.get_balance("alice").points == before[0] + 14


def test_window_edges_on_a_frozen_clock(clocked_hub: tuple[RunningHub, ManualClock]) -> None:
    """Exactly 300 s off either way is accepted; 1 ms more is refused (DESIGN §6: "more than 300 s")."""
    hub, clock = clocked_hub
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    with raw_caller(hub.target) as raw:
        for offset_ms in (-WINDOW_MS - 1, WINDOW_MS + 1):
            body = issue_body("alice", 50)
            with refused(UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW", f"offset {offset_ms} ms"):
                raw(ISSUE, body, sign(ISSUE, body, A, key, timestamp_ms=clock.now_ms() + offset_ms))
        assert snapshot(client, "alice") == before
        for offset_ms in (-WINDOW_MS, WINDOW_MS):
            body = issue_body("alice", 1)
            raw(ISSUE, body, sign(ISSUE, body, A, key, timestamp_ms=clock.now_ms() + offset_ms))
    assert client.get_balance("alice").points == before[0] + 2
    client.close()


def test_replay_stays_refused_after_the_window_and_nonce_pruning(clocked_hub: tuple[RunningHub, ManualClock]) -> None:
    """A nonce is forgotten only once its request's timestamp can no longer pass the window."""
    hub, clock = clocked_hub
    client, key = merchant_with_member(hub)
    start = clock.now_ms()
    with raw_caller(hub.target) as raw:
        # Signed as late as the window allows, so it stays fresh for the longest: until start + 2 windows.
        late_body = issue_body("alice", 10)
        late = sign(ISSUE, late_body, A, key, timestamp_ms=start + WINDOW_MS)
        on_time_body = issue_body("alice", 20)
        on_time = sign(ISSUE, on_time_body, A, key, timestamp_ms=start)
        raw(ISSUE, late_body, late)
        raw(ISSUE, on_time_body, on_time)

        clock.advance(WINDOW_MS + 1)
        with refused(UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW", "on-time request replayed after the window"):
            raw(ISSUE, on_time_body, on_time)
        with refused(UNAUTHENTICATED, "NONCE_REPLAYED", "late request replayed inside its window"):
            raw(ISSUE, late_body, late)

        # The hub's pruner keeps two windows of nonces: at start + 2 windows the late one is still fresh and known.
        clock.advance(WINDOW_MS - 1)
        nonces.prune(hub.hub.engine, clock.now_ms() - 2 * WINDOW_MS)
        with refused(UNAUTHENTICATED, "NONCE_REPLAYED", "late request replayed at the edge of its window"):
            raw(ISSUE, late_body, late)
        clock.advance(1)
        nonces.prune(hub.hub.engine, clock.now_ms() - 2 * WINDOW_MS)
        with refused(UNAUTHENTICATED, "TIMESTAMP_OUT_OF_WINDOW", "late request replayed after its window"):
            raw(ISSUE, late_body, late)

    clock.advance(-(clock.now_ms() - start))  # back to the wall clock, for the SDK's own signatures
    balance, activity = snapshot(client, "alice")
    assert balance == 130
    assert len(activity) == 3
    client.close()


def test_replayed_request_is_refused_and_applied_once(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")
    body = issue_body("alice", 25)
    metadata = sign(ISSUE, body, A, key)

    first = ledger_pb2.PointsMovement.FromString(raw(ISSUE, body, metadata))
    assert first.balance_points == 125
    with refused(UNAUTHENTICATED, "NONCE_REPLAYED"):
        raw(ISSUE, body, metadata)
    # A read is no exception: the nonce of a replayed GetBalance is refused too.
    read_body = ledger_pb2.GetBalanceRequest(merchant_id=A, member_ref="alice").SerializeToString()
    read_metadata = sign(GET_BALANCE, read_body, A, key)
    assert ledger_pb2.Balance.FromString(raw(GET_BALANCE, read_body, read_metadata)).points == 125
    with refused(UNAUTHENTICATED, "NONCE_REPLAYED"):
        raw(GET_BALANCE, read_body, read_metadata)
    # The nonce is spent for that key whatever is signed with it next.
    other_body = issue_body("alice", 25)
    nonce = dict(metadata)[HEADER_NONCE]
    with refused(UNAUTHENTICATED, "NONCE_REPLAYED"):
        raw(ISSUE, other_body, sign(ISSUE, other_body, A, key, nonce=nonce))

    balance, activity = snapshot(client, "alice")
    assert balance == 125
    assert activity == [first.operation_id, *before[1]]


def _send_at_once(raw: RawCall, method: str, body: bytes, metadata: Metadata, copies: int) -> list[Any]:
    barrier = threading.Barrier(copies)
    outcomes: list[bytes | errors.PointsxError] = []
    lock = threading.Lock()

    def send() -> None:
        barrier.wait()
        try:
            outcome: bytes | errors.PointsxError = raw(method, body, metadata)
        except errors.PointsxError as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=send) for _ in range(copies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_concurrent_replays_of_a_conversion_are_applied_once(hub: RunningHub, raw: RawCall) -> None:
    """A conversion's nonce is stored in the commit of its set-based batch: copies racing into one
    batch, or into the next ones, still convert once."""
    client, key = hub.admit(A, cap_micros=10**9)
    client.enroll_member("alice")
    client.issue_points("alice", 100)
    partner, _partner_key = hub.admit(B)
    partner.enroll_member("alice-b")
    partner.redeem_link_code("alice-b", client.create_link_code("alice").code)
    client.set_route(B, "outbound")
    partner.set_route(A, "inbound")
    body = exchange_pb2.ConvertRequest(
        request_id=new_id(), merchant_id=A, member_ref="alice", destination_merchant_id=B, src_points=40
    ).SerializeToString()
    copies = 8
    outcomes = _send_at_once(raw, CONVERT, body, sign(CONVERT, body, A, key), copies)
    accepted = [o for o in outcomes if isinstance(o, bytes)]
    refusals = [(o.code, o.reason) for o in outcomes if isinstance(o, errors.PointsxError)]
    assert len(accepted) == 1, outcomes
    assert refusals == [(UNAUTHENTICATED, "NONCE_REPLAYED")] * (copies - 1)
    assert client.get_balance("alice").points == 60
    assert partner.get_balance("alice-b").points == exchange_pb2.Conversion.FromString(accepted[0]).dst_points
    partner.close()
    client.close()


def test_concurrent_replays_are_applied_once(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    body = issue_body("alice", 25)
    metadata = sign(ISSUE, body, A, key)
    copies = 8
    outcomes = _send_at_once(raw, ISSUE, body, metadata, copies)
    accepted = [o for o in outcomes if isinstance(o, bytes)]
    refusals = [(o.code, o.reason) for o in outcomes if isinstance(o, errors.PointsxError)]
    assert len(accepted) == 1, outcomes
    assert refusals == [(UNAUTHENTICATED, "NONCE_REPLAYED")] * (copies - 1)
    assert client.get_balance("alice").points == 125
    assert len(list(client.iter_activity("alice"))) == 2


# --- key rotation ---------------------------------------------------------------------------------


def test_revoked_key_is_refused_and_its_replacement_works(hub: RunningHub, raw: RawCall) -> None:
    client, old_key = merchant_with_member(hub)
    old_key_id = client.key_id
    new_key = Ed25519PrivateKey.generate()
    added = client.add_key(new_key)
    assert added.key_id == key_id_of(public_key_bytes(new_key.public_key()))
    revoked = client.revoke_key(old_key_id)
    assert revoked.key_id == old_key_id
    with MerchantClient(hub.target, A, new_key) as renewed:
        before = snapshot(renewed, "alice")
    assert before[0] == 100

    with refused(UNAUTHENTICATED, "KEY_REVOKED"):
        client.issue_points("alice", 50)
    with refused(UNAUTHENTICATED, "KEY_REVOKED"):
        client.get_balance("alice")
    body = issue_body("alice", 50)
    with refused(UNAUTHENTICATED, "KEY_REVOKED"):
        raw(ISSUE, body, sign(ISSUE, body, A, old_key))

    with MerchantClient(hub.target, A, new_key) as renewed:
        assert snapshot(renewed, "alice") == before
        assert renewed.issue_points("alice", 5).balance_points == 105
        with refused(FAILED_PRECONDITION, "LAST_ACTIVE_KEY"):
            renewed.revoke_key(renewed.key_id)
        with refused(FAILED_PRECONDITION, "KEY_ALREADY_REVOKED"):
            renewed.revoke_key(old_key_id)
        # The refusals changed nothing: the new key still works, the old one is still revoked.
        statuses = {k.key_id: k.status for k in renewed.get_merchant().keys}
        assert statuses == {old_key_id: common_pb2.KEY_STATUS_REVOKED, renewed.key_id: common_pb2.KEY_STATUS_ACTIVE}
        assert renewed.get_balance("alice").points == 105
    client.close()


# --- authorisation --------------------------------------------------------------------------------


def test_merchant_cannot_touch_another_merchants_members(hub: RunningHub) -> None:
    client_a, key_a = merchant_with_member(hub, A)
    client_b, _key_b = merchant_with_member(hub, B)
    before_a, before_b = snapshot(client_a, "alice"), snapshot(client_b, "alice")
    attempts: list[tuple[str, Message, type[Message]]] = [
        ("GetBalance", ledger_pb2.GetBalanceRequest(merchant_id=B, member_ref="alice"), ledger_pb2.Balance),
        (
            "IssuePoints",
            ledger_pb2.IssuePointsRequest(request_id=new_id(), merchant_id=B, member_ref="alice", points=1_000),
            ledger_pb2.PointsMovement,
        ),
        (
            "RedeemPoints",
            ledger_pb2.RedeemPointsRequest(request_id=new_id(), merchant_id=B, member_ref="alice", points=100),
            ledger_pb2.PointsMovement,
        ),
        (
            "EnrollMember",
            ledger_pb2.EnrollMemberRequest(request_id=new_id(), merchant_id=B, member_ref="mallory"),
            ledger_pb2.Member,
        ),
        (
            "ListActivity",
            ledger_pb2.ListActivityRequest(merchant_id=B, member_ref="alice"),
            ledger_pb2.ListActivityResponse,
        ),
        ("ListActivity", ledger_pb2.ListActivityRequest(merchant_id=B), ledger_pb2.ListActivityResponse),
        (
            "CreateLinkCode",
            ledger_pb2.CreateLinkCodeRequest(request_id=new_id(), merchant_id=B, member_ref="alice"),
            ledger_pb2.LinkCode,
        ),
        (
            "Unlink",
            ledger_pb2.UnlinkRequest(request_id=new_id(), merchant_id=B, member_ref="alice"),
            ledger_pb2.Member,
        ),
    ]
    with closing(SignedTransport(hub.target, Signer(A, key_a), max_attempts=1)) as transport:
        for method, request, response_cls in attempts:
            with refused(PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS", method):
                transport.call(LEDGER + method, request, response_cls)

    assert snapshot(client_b, "alice") == before_b
    assert snapshot(client_a, "alice") == before_a
    with refused(grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND"):
        client_b.get_balance("mallory")


def test_merchant_cannot_change_another_merchants_keys_or_profile(hub: RunningHub) -> None:
    _client_a, key_a = merchant_with_member(hub, A)
    client_b, _key_b = merchant_with_member(hub, B)
    code = client_b.create_link_code("alice").code
    profile_b = client_b.get_merchant()
    before_b = snapshot(client_b, "alice")
    thief = Ed25519PrivateKey.generate()
    effective_at = Timestamp(seconds=int(time.time()) + 365 * 86_400)
    attempts: list[tuple[str, Message, type[Message]]] = [
        (
            "/pointsx.v1.MerchantService/AddKey",
            merchant_pb2.AddKeyRequest(
                request_id=new_id(), merchant_id=B, public_key=public_key_bytes(thief.public_key())
            ),
            common_pb2.KeyInfo,
        ),
        (
            "/pointsx.v1.MerchantService/RevokeKey",
            merchant_pb2.RevokeKeyRequest(request_id=new_id(), merchant_id=B, key_id=client_b.key_id),
            common_pb2.KeyInfo,
        ),
        (
            "/pointsx.v1.MerchantService/SchedulePointValue",
            merchant_pb2.SchedulePointValueRequest(
                request_id=new_id(), merchant_id=B, value_micros=1, effective_at=effective_at
            ),
            common_pb2.Merchant,
        ),
        (
            LEDGER + "RedeemLinkCode",
            ledger_pb2.RedeemLinkCodeRequest(request_id=new_id(), merchant_id=B, member_ref="bob", code=code),
            ledger_pb2.Member,
        ),
    ]
    with closing(SignedTransport(hub.target, Signer(A, key_a), max_attempts=1)) as transport:
        for method, request, response_cls in attempts:
            with refused(PERMISSION_DENIED, "CROSS_MERCHANT_ACCESS", method):
                transport.call(method, request, response_cls)

    assert client_b.get_merchant() == profile_b
    assert snapshot(client_b, "alice") == before_b
    with MerchantClient(hub.target, B, thief) as intruder, refused(UNAUTHENTICATED, "UNKNOWN_KEY"):
        intruder.get_balance("alice")
    client_b.close()


def test_operator_and_merchant_methods_are_kept_apart(hub: RunningHub) -> None:
    client, key = merchant_with_member(hub, A)
    before = snapshot(client, "alice")
    newcomer = Ed25519PrivateKey.generate()
    register = operator_pb2.RegisterMerchantRequest(
        request_id=new_id(),
        merchant_id="intruder",
        name="Intruder",
        currency="CNY",
        point_value_micros=10_000,
        public_key=public_key_bytes(newcomer.public_key()),
    )
    with (
        closing(SignedTransport(hub.target, Signer(A, key), max_attempts=1)) as merchant,
        closing(SignedTransport(hub.target, Signer("operator", hub.operator_key), max_attempts=1)) as operator,
    ):
        with refused(PERMISSION_DENIED, "OPERATOR_ONLY"):
            merchant.call(REGISTER_MERCHANT, register, common_pb2.Merchant)
        with refused(PERMISSION_DENIED, "OPERATOR_ONLY"):
            merchant.call(LIST_MERCHANTS, operator_pb2.ListMerchantsRequest(), operator_pb2.ListMerchantsResponse)

        issue = ledger_pb2.IssuePointsRequest(request_id=new_id(), merchant_id=A, member_ref="alice", points=9)
        with refused(PERMISSION_DENIED, "MERCHANT_ONLY"):
            operator.call(ISSUE, issue, ledger_pb2.PointsMovement)
        with refused(PERMISSION_DENIED, "MERCHANT_ONLY"):
            operator.call(
                GET_BALANCE, ledger_pb2.GetBalanceRequest(merchant_id=A, member_ref="alice"), ledger_pb2.Balance
            )

    assert snapshot(client, "alice") == before
    with hub.operator() as op:
        assert [m.merchant_id for m in op.list_merchants().merchants] == [A]
    with MerchantClient(hub.target, "intruder", newcomer) as intruder, refused(UNAUTHENTICATED, "UNKNOWN_KEY"):
        intruder.get_merchant()


def test_network_info_needs_no_credentials(hub: RunningHub, raw: RawCall) -> None:
    body = network_pb2.GetNetworkInfoRequest().SerializeToString()
    info = network_pb2.NetworkInfo.FromString(raw(NETWORK_INFO, body, []))
    assert info.version
    assert [k.key_id for k in info.hub_keys] == [hub.hub.hub_key_id]
    assert "CNY" in [c.code for c in info.currencies]
    # Junk credentials on a public call are ignored, not judged.
    junk = [(HEADER_CALLER, "nobody"), (HEADER_SIGNATURE, "!!!")]
    assert network_pb2.NetworkInfo.FromString(raw(NETWORK_INFO, body, junk)) == info


# --- malformed bodies -----------------------------------------------------------------------------


def garbage_bodies() -> list[bytes]:
    """Bodies no IssuePointsRequest parser accepts: fixed nasties plus seeded random bytes."""
    rng = random.Random(20240611)
    bodies = [
        b"\xff\xff\xff\xff",  # field 0x1fffffff… with an invalid wire type
        b"\x08\x80",  # truncated varint
        b"\x0a\x05abc",  # length-delimited field running past the end
        b"\x0a\x02\xff\xfe",  # request_id that is not UTF-8
        b"garbage!",
        *(rng.randbytes(rng.randrange(8, 256)) for _ in range(8)),
    ]
    for body in bodies:
        with pytest.raises(DecodeError):
            ledger_pb2.IssuePointsRequest.FromString(body)
    return bodies


def test_garbage_body_is_malformed_request_and_the_hub_keeps_serving(hub: RunningHub, raw: RawCall) -> None:
    client, key = merchant_with_member(hub)
    before = snapshot(client, "alice")

    for body in garbage_bodies():
        with refused(INVALID_ARGUMENT, "MALFORMED_REQUEST", body.hex()):
            raw(ISSUE, body, sign(ISSUE, body, A, key))
    # Authentication comes first: unsigned garbage is refused for its credentials, not parsed.
    with refused(UNAUTHENTICATED, "MISSING_CREDENTIALS"):
        raw(ISSUE, b"\xff\xff\xff\xff", [])

    assert snapshot(client, "alice") == before
    assert client.issue_points("alice", 1).balance_points == 101
    assert network_pb2.NetworkInfo.FromString(raw(NETWORK_INFO, b"", [])).version
