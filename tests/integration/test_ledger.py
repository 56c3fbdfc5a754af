"""Ledger scenarios over real gRPC (DESIGN §1-§3, §7): members, points, paging, suspension,
admission, profiles, point value schedules and linking.

Every refusal is checked for its status code and its ErrorInfo reason, and for changing nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.domain.clock import ManualClock
from exchange.operator_client import OperatorClient
from exchange.rpc.translate import encode_token
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import common_pb2, ledger_pb2
from merchant_sdk.signing import key_id_of, public_key_bytes
from tests.auditor import check_invariants
from tests.harness import RunningHub

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
MINUTE_MS = 60_000


@contextmanager
def refused(cls: type[errors.PointsxError], code: grpc.StatusCode, reason: str) -> Iterator[None]:
    """The block must fail with exactly `cls`, carrying `code` and the ErrorInfo `reason`."""
    with pytest.raises(errors.PointsxError) as info:
        yield
    error = info.value
    assert type(error) is cls, f"expected {cls.__name__}, got {type(error).__name__}: {error}"
    assert error.code == code, f"{reason}: expected {code}, got {error.code}"
    assert error.reason == reason


def snapshot(client: MerchantClient, member_ref: str) -> tuple[int, list[str]]:
    """A member's balance and every operation id of its activity, newest first."""
    return client.get_balance(member_ref).points, [a.operation_id for a in client.iter_activity(member_ref)]


def merchant_ids(op: OperatorClient) -> list[str]:
    return [m.merchant_id for m in op.list_merchants(page_size=500).merchants]


def new_public_key() -> bytes:
    return public_key_bytes(Ed25519PrivateKey.generate().public_key())


# --- members and points ---------------------------------------------------------------------------


def test_enroll_issue_redeem_balance(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    member = client.enroll_member("alice")
    assert (member.merchant_id, member.member_ref, member.points) == ("coffee", "alice", 0)
    assert list(member.linked_merchant_ids) == []

    issued = client.issue_points("alice", 500, memo="welcome")
    assert (issued.merchant_id, issued.member_ref) == ("coffee", "alice")
    assert (issued.points, issued.balance_points) == (500, 500)
    assert issued.operation_id.startswith("op_")
    redeemed = client.redeem_points("alice", 120)
    assert (redeemed.points, redeemed.balance_points) == (120, 380)
    assert redeemed.operation_id > issued.operation_id

    balance = client.get_balance("alice")
    assert (balance.merchant_id, balance.member_ref, balance.points) == ("coffee", "alice", 380)

    activity = list(client.iter_activity("alice"))
    assert [(a.kind, a.points_delta, a.operation_id) for a in activity] == [
        (ledger_pb2.ACTIVITY_KIND_REDEEM, -120, redeemed.operation_id),
        (ledger_pb2.ACTIVITY_KIND_ISSUE, 500, issued.operation_id),
    ]
    assert activity[1].memo == "welcome"


def test_enroll_twice_is_member_exists(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    first = client.enroll_member("alice")
    client.issue_points("alice", 70)
    before = snapshot(client, "alice")

    with refused(errors.MemberExists, ALREADY_EXISTS, "MEMBER_EXISTS"):
        client.enroll_member("alice")

    assert snapshot(client, "alice") == before
    again = client.get_balance("alice")
    assert again.points == 70 and again.member_ref == first.member_ref


def test_unknown_member_is_member_not_found(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 10)
    before = snapshot(client, "alice")

    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.issue_points("ghost", 10)
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.redeem_points("ghost", 1)
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.get_balance("ghost")
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.list_activity_page("ghost")
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.create_link_code("ghost")

    assert snapshot(client, "alice") == before
    assert [a.member_ref for a in client.iter_activity()] == ["alice"]


@pytest.mark.parametrize("points", [0, -5, 10**12 + 1])
def test_points_out_of_range_is_invalid_amount(hub: RunningHub, points: int) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 50)
    before = snapshot(client, "alice")

    with refused(errors.InvalidAmount, INVALID_ARGUMENT, "INVALID_AMOUNT"):
        client.issue_points("alice", points)
    with refused(errors.InvalidAmount, INVALID_ARGUMENT, "INVALID_AMOUNT"):
        client.redeem_points("alice", points)

    assert snapshot(client, "alice") == before


def test_largest_amount_is_accepted(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("whale")
    assert client.issue_points("whale", 10**12).balance_points == 10**12
    assert client.issue_points("whale", 10**12).balance_points == 2 * 10**12
    assert client.redeem_points("whale", 10**12).balance_points == 10**12
    assert client.get_balance("whale").points == 10**12


@pytest.mark.parametrize("member_ref", ["", "has space", "x" * 200], ids=["empty", "space", "200-chars"])
def test_invalid_member_ref(hub: RunningHub, member_ref: str) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 5)
    before = snapshot(client, "alice")

    with refused(errors.InvalidMemberRef, INVALID_ARGUMENT, "INVALID_MEMBER_REF"):
        client.enroll_member(member_ref)
    with refused(errors.InvalidMemberRef, INVALID_ARGUMENT, "INVALID_MEMBER_REF"):
        client.issue_points(member_ref, 5)
    with refused(errors.InvalidMemberRef, INVALID_ARGUMENT, "INVALID_MEMBER_REF"):
        client.redeem_points(member_ref, 5)
    with refused(errors.InvalidMemberRef, INVALID_ARGUMENT, "INVALID_MEMBER_REF"):
        client.get_balance(member_ref)

    assert snapshot(client, "alice") == before
    assert [a.member_ref for a in client.iter_activity()] == ["alice"]


def test_member_ref_of_128_chars_is_accepted(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    ref = "a" * 128
    client.enroll_member(ref)
    assert client.issue_points(ref, 3).balance_points == 3


def test_bad_request_id_is_invalid_request_id(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 40)
    before = snapshot(client, "alice")

    with refused(errors.InvalidRequestId, INVALID_ARGUMENT, "INVALID_REQUEST_ID"):
        client.issue_points("alice", 5, request_id="nope")
    with refused(errors.InvalidRequestId, INVALID_ARGUMENT, "INVALID_REQUEST_ID"):
        client.redeem_points("alice", 5, request_id="nope")
    with refused(errors.InvalidRequestId, INVALID_ARGUMENT, "INVALID_REQUEST_ID"):
        client.enroll_member("bob", request_id="nope")

    assert snapshot(client, "alice") == before
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.get_balance("bob")


def test_redeem_more_than_balance_is_insufficient_points(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 100)
    before = snapshot(client, "alice")

    with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS"):
        client.redeem_points("alice", 101)
    assert snapshot(client, "alice") == before

    # The whole balance can go; then even one point is too many.
    assert client.redeem_points("alice", 100).balance_points == 0
    with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS"):
        client.redeem_points("alice", 1)
    assert client.get_balance("alice").points == 0


# --- activity paging --------------------------------------------------------------------------


def test_list_activity_pages_newest_first(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    issued = [client.issue_points("alice", n).operation_id for n in range(1, 8)]

    pages: list[ledger_pb2.ListActivityResponse] = []
    token = ""
    while True:
        page = client.list_activity_page("alice", page_size=3, page_token=token)
        pages.append(page)
        if not page.next_page_token:
            break
        token = page.next_page_token
        assert len(pages) < 10, "paging does not terminate"

    assert [len(p.activities) for p in pages] == [3, 3, 1]
    seen = [a.operation_id for p in pages for a in p.activities]
    assert seen == list(reversed(issued)), "every operation exactly once, newest first"
    assert [a.points_delta for p in pages for a in p.activities] == [7, 6, 5, 4, 3, 2, 1]
    assert all(a.kind == ledger_pb2.ACTIVITY_KIND_ISSUE for p in pages for a in p.activities)

    # The merchant-wide listing (no member_ref) pages the same way.
    assert [a.operation_id for a in client.iter_activity(page_size=3)] == seen
    # A page exactly as large as what is left carries no next token.
    whole = client.list_activity_page("alice", page_size=7)
    assert len(whole.activities) == 7 and whole.next_page_token == ""


@pytest.mark.parametrize("token", ["nope", "!!!!", encode_token("abc"), encode_token("-5"), "A" * 300])
def test_bad_page_token_is_invalid_page_token(hub: RunningHub, token: str) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 1)
    with refused(errors.InvalidPageToken, INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"):
        client.list_activity_page("alice", page_size=3, page_token=token)


def test_page_token_beyond_int64_is_invalid_page_token(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 1)
    with refused(errors.InvalidPageToken, INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"):
        client.list_activity_page("alice", page_token=encode_token("9999999999999999999"))


# --- suspension -----------------------------------------------------------------------------


def test_suspended_merchant_cannot_mutate_but_can_read(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    client.issue_points("alice", 100)
    before = snapshot(client, "alice")

    with hub.operator() as op:
        suspended = op.set_merchant_status("coffee", active=False, reason="unpaid invoice")
    assert suspended.status == common_pb2.MERCHANT_STATUS_SUSPENDED
    assert client.get_merchant().status == common_pb2.MERCHANT_STATUS_SUSPENDED

    with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED"):
        client.issue_points("alice", 10)
    with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED"):
        client.redeem_points("alice", 10)
    with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED"):
        client.enroll_member("bob")
    with refused(errors.MerchantSuspended, FAILED_PRECONDITION, "MERCHANT_SUSPENDED"):
        client.create_link_code("alice")

    # Reads still work, and nothing moved.
    assert snapshot(client, "alice") == before
    with refused(errors.MemberNotFound, NOT_FOUND, "MEMBER_NOT_FOUND"):
        client.get_balance("bob")

    with hub.operator() as op:
        active = op.set_merchant_status("coffee", active=True)
    assert active.status == common_pb2.MERCHANT_STATUS_ACTIVE
    assert client.issue_points("alice", 10).balance_points == 110
    assert client.redeem_points("alice", 10).balance_points == 100
    assert client.enroll_member("bob").member_ref == "bob"


# --- admission ------------------------------------------------------------------------------


def test_register_merchant_refusals(hub: RunningHub) -> None:
    _coffee, _key = hub.admit("coffee")
    with hub.operator() as op:
        before = merchant_ids(op)

        def register(
            merchant_id: str = "tea", currency: str = "CNY", value: int = 10_000, public_key: bytes | None = None
        ) -> common_pb2.Merchant:
            key = new_public_key() if public_key is None else public_key
            return op.register_merchant(merchant_id, "Tea", currency, value, key)

        with refused(errors.InvalidMerchantId, INVALID_ARGUMENT, "INVALID_MERCHANT_ID"):
            register(merchant_id="Bad Id")
        with refused(errors.InvalidMerchantId, INVALID_ARGUMENT, "INVALID_MERCHANT_ID"):
            register(merchant_id="operator")
        with refused(errors.UnsupportedCurrency, INVALID_ARGUMENT, "UNSUPPORTED_CURRENCY"):
            register(currency="XXX")
        with refused(errors.InvalidPointValue, INVALID_ARGUMENT, "INVALID_POINT_VALUE"):
            register(value=0)
        with refused(errors.InvalidPointValue, INVALID_ARGUMENT, "INVALID_POINT_VALUE"):
            register(value=-1)
        with refused(errors.InvalidPublicKey, INVALID_ARGUMENT, "INVALID_PUBLIC_KEY"):
            register(public_key=new_public_key()[:31])
        with refused(errors.InvalidPublicKey, INVALID_ARGUMENT, "INVALID_PUBLIC_KEY"):
            register(public_key=b"")
        with refused(errors.MerchantExists, ALREADY_EXISTS, "MERCHANT_EXISTS"):
            register(merchant_id="coffee")
        assert merchant_ids(op) == before == ["coffee"]

        # The same admission, well formed, then goes through.
        tea = register()
        assert tea.merchant_id == "tea" and tea.status == common_pb2.MERCHANT_STATUS_ACTIVE
        assert merchant_ids(op) == ["coffee", "tea"]


# --- profiles and point values --------------------------------------------------------------------


def test_get_merchant_public_versus_private(hub: RunningHub) -> None:
    coffee, coffee_key = hub.admit("coffee")
    _tea, tea_key = hub.admit("tea", value_micros=20_000, cap_micros=5_000_000)

    other = coffee.get_merchant("tea")
    assert (other.merchant_id, other.name, other.currency) == ("tea", "Tea", "CNY")
    assert other.status == common_pb2.MERCHANT_STATUS_ACTIVE
    assert other.point_value.value_micros == 20_000
    assert list(other.keys) == []
    assert not other.HasField("bank")
    assert not other.HasField("net_debit_cap") or other.net_debit_cap.micros == 0

    own = coffee.get_merchant()
    assert own.merchant_id == "coffee"
    assert [k.key_id for k in own.keys] == [coffee.key_id]
    assert own.keys[0].public_key == public_key_bytes(coffee_key.public_key())
    assert own.keys[0].status == common_pb2.KEY_STATUS_ACTIVE
    assert own.HasField("net_debit_cap") and own.net_debit_cap.currency == "CNY"
    assert own.HasField("bank")
    assert coffee.get_merchant("coffee") == own

    tea_own = MerchantClient(hub.target, "tea", tea_key)
    try:
        tea_view = tea_own.get_merchant()
        assert tea_view.net_debit_cap.micros == 5_000_000
        assert [k.key_id for k in tea_view.keys] == [key_id_of(tea_key.public_key())]
    finally:
        tea_own.close()

    with refused(errors.MerchantNotFound, NOT_FOUND, "MERCHANT_NOT_FOUND"):
        coffee.get_merchant("nobody")


def test_schedule_point_value_respects_notice_period(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee", value_micros=10_000)
    now = datetime.now(UTC)

    with refused(errors.NoticePeriodTooShort, FAILED_PRECONDITION, "NOTICE_PERIOD_TOO_SHORT"):
        client.schedule_point_value(12_000, now + timedelta(hours=23))
    unchanged = client.get_merchant()
    assert unchanged.point_value.value_micros == 10_000
    assert list(unchanged.scheduled_values) == []

    effective = now + timedelta(hours=25)
    scheduled = client.schedule_point_value(12_000, effective)
    assert scheduled.point_value.value_micros == 10_000, "the value in force does not change early"
    assert [(v.value_micros, v.effective_at.ToMilliseconds()) for v in scheduled.scheduled_values] == [
        (12_000, int(effective.timestamp() * 1000))
    ]
    reread = client.get_merchant()
    assert reread.point_value.value_micros == 10_000
    assert [v.value_micros for v in reread.scheduled_values] == [12_000]


# --- linking --------------------------------------------------------------------------------


def test_link_redeem_reuse_and_unlink(hub: RunningHub) -> None:
    a, _ka = hub.admit("alpha")
    b, _kb = hub.admit("beta")
    a.enroll_member("alice")
    b.enroll_member("alice-b")
    a.issue_points("alice", 30)
    b.issue_points("alice-b", 40)

    link = a.create_link_code("alice")
    assert len(link.code) == 8
    assert link.expires_at.ToMilliseconds() > int(time.time() * 1000)

    member = b.redeem_link_code("alice-b", link.code)
    assert list(member.linked_merchant_ids) == ["alpha"]
    assert list(a.get_balance("alice").linked_merchant_ids) == ["beta"]
    assert list(b.get_balance("alice-b").linked_merchant_ids) == ["alpha"]
    assert (a.get_balance("alice").points, b.get_balance("alice-b").points) == (30, 40)

    # A used code is gone; a code nobody issued is invalid, whatever its shape.
    b.enroll_member("carol-b")
    with refused(errors.LinkCodeInvalid, NOT_FOUND, "LINK_CODE_INVALID"):
        b.redeem_link_code("carol-b", link.code)
    for garbage in ["garbage!", "ZZZZZZZZ", "short", ""]:
        with refused(errors.LinkCodeInvalid, NOT_FOUND, "LINK_CODE_INVALID"):
            b.redeem_link_code("carol-b", garbage)
    assert list(b.get_balance("carol-b").linked_merchant_ids) == []

    # The merchant that made a code cannot redeem it itself.
    own = a.create_link_code("alice")
    a.enroll_member("alice-2")
    with refused(errors.AlreadyLinked, FAILED_PRECONDITION, "ALREADY_LINKED"):
        a.redeem_link_code("alice-2", own.code)
    assert list(a.get_balance("alice-2").linked_merchant_ids) == []

    unlinked = b.unlink("alice-b")
    assert list(unlinked.linked_merchant_ids) == []
    assert list(b.get_balance("alice-b").linked_merchant_ids) == []
    assert list(a.get_balance("alice").linked_merchant_ids) == []
    assert (a.get_balance("alice").points, b.get_balance("alice-b").points) == (30, 40)

    with refused(errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED"):
        b.unlink("alice-b")
    with refused(errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED"):
        a.unlink("alice")


def test_link_code_expires_after_ten_minutes(tmp_path: Path, database_url: str | None) -> None:
    # The hub's clock is manual; a wide auth window lets the SDK's real-time signatures through.
    clock = ManualClock(time.time_ns() // 1_000_000)
    running = RunningHub(tmp_path, database_url, clock=clock, config_overrides={"auth_window_s": 3600})
    try:
        a, _ka = running.admit("alpha")
        b, _kb = running.admit("beta")
        for ref in ("alice", "bob"):
            a.enroll_member(ref)
            b.enroll_member(f"{ref}-b")
        start = clock.now_ms()
        alice_code = a.create_link_code("alice")
        bob_code = a.create_link_code("bob")
        assert alice_code.expires_at.ToMilliseconds() == start + 10 * MINUTE_MS

        clock.advance(10 * MINUTE_MS - 1_000)  # 9 min 59 s: still valid
        assert list(b.redeem_link_code("alice-b", alice_code.code).linked_merchant_ids) == ["alpha"]

        clock.advance(MINUTE_MS + 1_000)  # 11 min: expired
        with refused(errors.LinkCodeExpired, FAILED_PRECONDITION, "LINK_CODE_EXPIRED"):
            b.redeem_link_code("bob-b", bob_code.code)
        assert list(b.get_balance("bob-b").linked_merchant_ids) == []
        assert list(a.get_balance("bob").linked_merchant_ids) == []

        # A fresh code made now works.
        fresh = a.create_link_code("bob")
        assert list(b.redeem_link_code("bob-b", fresh.code).linked_merchant_ids) == ["alpha"]
        a.close()
        b.close()
        check_invariants(running.hub.engine)
    finally:
        running.stop()
