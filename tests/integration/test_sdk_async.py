"""The asyncio client (`AsyncMerchantClient`) over real gRPC: its whole surface against a real hub.

Each test runs a coroutine with `asyncio.run` (the repo has no pytest-asyncio): the hub serves on its
own loop thread (tests/harness.py), the client lives in the test's loop. Operator actions use the
blocking OperatorClient on a worker thread, so the test's loop keeps serving its streams meanwhile.

`FaultyHop` is a real gRPC server between a client and the hub. It forwards each call's signed bytes
untouched and can lose the hub's reply, hang, or cut a stream after an event: the seam that shows a
retry reuses its request (the hub applies it once) and a stream resumes from its last cursor.
"""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.background import BackgroundHub
from exchange.config import init_data_dir, load_key
from exchange.operator_client import OperatorClient
from exchange.rpc.server import TlsFiles
from exchange.runtime import open_hub
from merchant_sdk import AsyncEventStream, AsyncMerchantClient, TlsOptions, errors, verify_statement
from merchant_sdk._pb.pointsx.v1 import clearing_pb2, common_pb2, exchange_pb2, ledger_pb2
from merchant_sdk.signing import HEADER_NONCE, private_key_pem, public_key_bytes
from tests.harness import RunningHub
from tests.integration.test_ledger import refused
from tests.integration.test_tls import _ca, _issue

R = TypeVar("R")
if TYPE_CHECKING:  # generic in the stubs only
    RawHandler = grpc.GenericRpcHandler[bytes, bytes]
else:
    RawHandler = grpc.GenericRpcHandler

SHOP, DINER = "shop", "diner"
ALICE, ALICE_D = "alice", "alice-d"  # one person's accounts at shop and at diner
BIG_CAP = 10**12
WAIT_S = 10.0
FROM_START = "0.0"  # a cursor before every event
OUT, IN = exchange_pb2.EVENT_TYPE_CONVERSION_OUT, exchange_pb2.EVENT_TYPE_CONVERSION_IN
HEARTBEAT, STATEMENT_READY = exchange_pb2.EVENT_TYPE_HEARTBEAT, exchange_pb2.EVENT_TYPE_STATEMENT_READY
ISSUE, CONVERT = "/pointsx.v1.LedgerService/IssuePoints", "/pointsx.v1.ExchangeService/Convert"
BALANCE, STREAM = "/pointsx.v1.LedgerService/GetBalance", "/pointsx.v1.ExchangeService/StreamEvents"
LOSE_REPLY, DOWN, HANG, CUT_AFTER_EVENT = "lose-reply", "down", "hang", "cut-after-event"
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))


def admit(hub: RunningHub, merchant_id: str, value_micros: int = 10_000) -> Ed25519PrivateKey:
    """Register a merchant (blocking: call it before the loop or through `asyncio.to_thread`)."""
    sync_client, key = hub.admit(merchant_id, value_micros=value_micros, cap_micros=BIG_CAP)
    sync_client.close()
    return key


async def operator(hub: RunningHub, action: Callable[[OperatorClient], R]) -> R:
    def act() -> R:
        with hub.operator() as op:
            return action(op)

    return await asyncio.to_thread(act)


async def pair(hub: RunningHub, *, issued: int = 1_000) -> tuple[AsyncMerchantClient, AsyncMerchantClient]:
    """shop and diner, alice at shop holding `issued` linked to alice-d at diner, route shop -> diner open."""
    keys = [await asyncio.to_thread(admit, hub, m) for m in (SHOP, DINER)]
    shop, diner = (AsyncMerchantClient(hub.target, m, k) for m, k in zip((SHOP, DINER), keys, strict=True))
    await asyncio.gather(shop.enroll_member(ALICE), diner.enroll_member(ALICE_D))
    await shop.issue_points(ALICE, issued)
    await diner.redeem_link_code(ALICE_D, (await shop.create_link_code(ALICE)).code)
    await shop.set_route(DINER, "outbound")
    assert (await diner.set_route(SHOP, "inbound")).state == common_pb2.ROUTE_STATE_OPEN
    return shop, diner


async def points(*accounts: tuple[AsyncMerchantClient, str]) -> list[int]:
    return [(await client.get_balance(ref)).points for client, ref in accounts]


async def next_event(stream: AsyncEventStream, timeout: float = WAIT_S) -> exchange_pb2.Event:
    """The next event that is not a heartbeat, within `timeout`."""
    while True:
        event = await asyncio.wait_for(anext(stream), timeout)
        if event.type != HEARTBEAT:
            return event


def summary(events: list[exchange_pb2.Event]) -> list[tuple[int, str]]:
    return [(e.type, e.conversion.conversion_id) for e in events]


# --- a fault-injecting hop between the client and the hub ------------------------------------------


class FaultyHop(RawHandler):
    """Forwards every call to the hub as it came (bytes and x-pointsx-* metadata), records it, and
    applies the next fault planned for its method: LOSE_REPLY (the hub acted, the client hears
    UNAVAILABLE), DOWN (UNAVAILABLE, the hub never asked), HANG (no answer: the client's deadline
    ends it), CUT_AFTER_EVENT (a stream dies with UNAVAILABLE after its first non-heartbeat event)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.calls: dict[str, list[tuple[bytes, dict[str, str | bytes]]]] = defaultdict(list)
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((self,))
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    async def __aenter__(self) -> FaultyHop:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
        await self._channel.close(None)

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = str(details.method)
        if method == STREAM:
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._stream, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))

    def _record(self, method: str, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Any, str]:
        metadata = tuple((k, v) for k, v in context.invocation_metadata() or () if k.startswith("x-pointsx-"))
        self.calls[method].append((body, dict(metadata)))
        return metadata, self.faults[method].pop(0) if self.faults[method] else ""

    async def _unary(self, method: str, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        metadata, fault = self._record(method, body, context)
        if fault == HANG:
            await asyncio.sleep(WAIT_S)  # cancelled when the client's deadline passes
        if fault == DOWN:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the hub is out of reach")
        try:
            reply: bytes = await self._channel.unary_unary(method, None, None)(body, metadata=metadata, timeout=WAIT_S)
        except grpc.aio.AioRpcError as exc:
            trailing: Any = tuple(exc.trailing_metadata())  # (key, value) pairs at run time, whatever the stubs say
            await context.abort(exc.code(), exc.details() or "", trailing)  # relayed with its ErrorInfo
        if fault == LOSE_REPLY:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the hub answered, the answer was lost")
        return reply

    async def _stream(
        self, method: str, body: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        metadata, fault = self._record(method, body, context)
        call = self._channel.unary_stream(method, None, None)(body, metadata=metadata)
        try:
            async for raw in call:
                yield raw
                if fault == CUT_AFTER_EVENT and exchange_pb2.Event.FromString(raw).type != HEARTBEAT:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection cut")
        finally:
            call.cancel()


# --- members, points, idempotency --------------------------------------------------------------------


def test_members_points_activity_and_a_typed_refusal(hub: RunningHub) -> None:
    key = admit(hub, SHOP)

    async def scenario() -> None:
        async with AsyncMerchantClient(hub.target, SHOP, key) as shop:
            member = await shop.enroll_member(ALICE)
            assert (member.merchant_id, member.member_ref, member.points) == (SHOP, ALICE, 0)
            with refused(errors.MemberExists, grpc.StatusCode.ALREADY_EXISTS, "MEMBER_EXISTS"):
                await shop.enroll_member(ALICE)
            issued = await shop.issue_points(ALICE, 500, memo="welcome")
            redeemed = await shop.redeem_points(ALICE, 120)
            assert (issued.balance_points, redeemed.balance_points) == (500, 380)

            with refused(errors.InsufficientPoints, FAILED_PRECONDITION, "INSUFFICIENT_POINTS"):
                await shop.redeem_points(ALICE, 381)
            balance = await shop.get_balance(ALICE)
            assert (balance.merchant_id, balance.member_ref, balance.points) == (SHOP, ALICE, 380)

            # Many calls in flight on one client at once: each posts once.
            moves = await asyncio.gather(*(shop.issue_points(ALICE, n) for n in range(1, 21)))
            assert len({m.operation_id for m in moves}) == 20
            assert (await shop.get_balance(ALICE)).points == 380 + 210

            activity = [a async for a in shop.iter_activity(ALICE, page_size=7)]  # three pages
            assert [a.operation_id for a in activity[-2:]] == [redeemed.operation_id, issued.operation_id]
            assert (activity[-1].kind, activity[-1].points_delta, activity[-1].memo) == (
                ledger_pb2.ACTIVITY_KIND_ISSUE, 500, "welcome",
            )  # fmt: skip
            assert len(activity) == 22 and activity[-2].kind == ledger_pb2.ACTIVITY_KIND_REDEEM
            first = await shop.list_activity_page(page_size=5)
            assert [a.operation_id for a in first.activities] == [a.operation_id for a in activity[:5]]
            assert first.next_page_token

    run(scenario)


def test_the_same_request_id_posts_once(hub: RunningHub) -> None:
    async def scenario() -> None:
        shop, diner = await pair(hub, issued=1_000)
        async with shop, diner:
            rid = "4b7f37a2-5d1c-4e0a-9f7e-0d6f1d1b2c3e"
            first = await shop.issue_points(ALICE, 40, request_id=rid)
            assert await shop.issue_points(ALICE, 40, request_id=rid) == first
            with refused(errors.RequestIdReused, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"):
                await shop.issue_points(ALICE, 41, request_id=rid)

            conv_rid = "9c0e1f2a-3b4c-4d5e-8f60-718293a4b5c6"
            conversion = await shop.convert(ALICE, DINER, 100, request_id=conv_rid)
            assert await shop.convert(ALICE, DINER, 100, request_id=conv_rid) == conversion
            assert await points((shop, ALICE), (diner, ALICE_D)) == [1_040 - 100, conversion.dst_points]

    run(scenario)


def test_a_lost_reply_is_retried_with_the_same_request_id_and_posts_once(hub: RunningHub) -> None:
    async def scenario() -> None:
        shop, diner = await pair(hub, issued=1_000)
        async with shop, diner, FaultyHop(hub.target) as hop:
            via_hop = AsyncMerchantClient(hop.target, SHOP, shop.signer.private_key)
            async with via_hop:
                hop.faults[ISSUE] = [LOSE_REPLY]
                moved = await via_hop.issue_points(ALICE, 70)
                hop.faults[CONVERT] = [LOSE_REPLY, LOSE_REPLY]
                conversion = await via_hop.convert(ALICE, DINER, 300)

            for method, attempts in ((ISSUE, 2), (CONVERT, 3)):
                sent = hop.calls[method]
                assert len(sent) == attempts, f"{method}: {len(sent)} attempts"
                assert len({body for body, _ in sent}) == 1, "every attempt sends the same bytes (same request_id)"
                assert len({md[HEADER_NONCE] for _, md in sent}) == attempts, "each attempt is signed afresh"
            assert moved.balance_points == 1_070
            assert await points((shop, ALICE), (diner, ALICE_D)) == [770, conversion.dst_points]
            ids = [a.operation_id async for a in shop.iter_activity(ALICE)]
            assert ids.count(moved.operation_id) == ids.count(conversion.conversion_id) == 1

    run(scenario)


def test_deadline_and_retries_are_bounded(hub: RunningHub) -> None:
    key = admit(hub, SHOP)

    async def scenario() -> None:
        async with FaultyHop(hub.target) as hop:
            hop.faults[BALANCE] = [HANG, HANG, DOWN, DOWN]
            async with AsyncMerchantClient(hop.target, SHOP, key, timeout_s=0.3, max_attempts=2) as client:
                with pytest.raises(errors.TransientError) as late:
                    await client.get_balance(ALICE)
                assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert len(hop.calls[BALANCE]) == 2
                with pytest.raises(errors.TransientError) as gone:
                    await client.get_balance(ALICE)
                assert gone.value.code == grpc.StatusCode.UNAVAILABLE and len(hop.calls[BALANCE]) == 4
                # The next attempt reaches the hub, whose refusal comes back typed, not retried.
                with refused(errors.MemberNotFound, grpc.StatusCode.NOT_FOUND, "MEMBER_NOT_FOUND"):
                    await client.get_balance(ALICE)
                assert len(hop.calls[BALANCE]) == 5

    run(scenario)


# --- linking, routes, quotes, conversions -------------------------------------------------------------


def test_links_routes_quotes_and_conversions(hub: RunningHub) -> None:
    keys = {m: admit(hub, m) for m in (SHOP, DINER)}

    async def scenario() -> None:
        async with (
            AsyncMerchantClient(hub.target, SHOP, keys[SHOP]) as shop,
            AsyncMerchantClient(hub.target, DINER, keys[DINER]) as diner,
        ):
            await shop.enroll_member(ALICE)
            await shop.issue_points(ALICE, 5_000)
            await diner.enroll_member(ALICE_D)
            code = await shop.create_link_code(ALICE)
            assert len(code.code) == 8
            linked = await diner.redeem_link_code(ALICE_D, code.code)
            assert list(linked.linked_merchant_ids) == [SHOP]

            with refused(errors.RouteClosed, FAILED_PRECONDITION, "ROUTE_CLOSED"):
                await shop.convert(ALICE, DINER, 100)
            assert (await shop.set_route(DINER, "outbound")).outbound_open
            route = await diner.set_route(SHOP, "inbound")
            assert route.inbound_accepted and route.state == common_pb2.ROUTE_STATE_OPEN
            assert [(r.source_merchant_id, r.destination_merchant_id) for r in await shop.list_routes()] == [
                (SHOP, DINER)
            ]
            assert (await diner.list_routes_page(page_size=1)).routes[0] == route
            with pytest.raises(ValueError):
                await shop.set_route(DINER, "sideways")

            quote = await shop.quote_conversion(ALICE, DINER, src_points=1_000)
            by_target = await shop.quote_conversion(ALICE, DINER, dst_points=quote.dst_points)
            assert by_target.src_points <= quote.src_points and by_target.dst_points >= quote.dst_points
            with pytest.raises(ValueError):
                await shop.quote_conversion(ALICE, DINER, src_points=1, dst_points=1)
            quoted = await shop.convert(ALICE, DINER, quote_id=quote.quote_id)
            assert (quoted.quote_id, quoted.src_points, quoted.dst_points) == (quote.quote_id, 1_000, quote.dst_points)
            assert quoted.src_cash.micros == 1_000 * 10_000
            assert await shop.get_conversion(quoted.conversion_id) == quoted
            theirs = await diner.get_conversion(quoted.conversion_id)  # the partner sees its own member only
            assert (theirs.conversion_id, theirs.dst_member_ref, theirs.src_member_ref) == (
                quoted.conversion_id, ALICE_D, "",
            )  # fmt: skip

            batch = await shop.convert_batch(
                [shop.conversion_request(ALICE, DINER, 200), shop.conversion_request(ALICE, DINER, 10**9)]
            )
            done, failed = batch.results
            assert done.WhichOneof("outcome") == "conversion" and done.conversion.src_points == 200
            error = errors.from_status(failed.error)
            assert type(error) is errors.InsufficientPoints and error.reason == "INSUFFICIENT_POINTS"
            assert await points((shop, ALICE), (diner, ALICE_D)) == [3_800, quoted.dst_points + 200 * 99 // 100]

            assert list((await diner.unlink(ALICE_D)).linked_merchant_ids) == []
            with refused(errors.NotLinked, FAILED_PRECONDITION, "NOT_LINKED"):
                await shop.convert(ALICE, DINER, 10)

    run(scenario)


# --- events ------------------------------------------------------------------------------------------------


def test_events_deliver_a_conversion_and_resume_from_its_cursor(hub: RunningHub) -> None:
    async def scenario() -> None:
        shop, diner = await pair(hub, issued=1_000)
        async with shop, diner:
            first = await shop.convert(ALICE, DINER, 100)
            async with shop.events(cursor=FROM_START) as stream:
                seen = await next_event(stream)
            assert summary([seen]) == [(OUT, first.conversion_id)]
            assert seen.conversion.src_member_ref == ALICE and stream.cursor == seen.cursor

            second = await shop.convert(ALICE, DINER, 200)
            async with diner.events(cursor=FROM_START) as inbound:
                assert summary([await next_event(inbound), await next_event(inbound)]) == [
                    (IN, first.conversion_id), (IN, second.conversion_id),
                ]  # fmt: skip
            # From the saved cursor: exactly what followed it, then live events as they happen.
            async with shop.events(cursor=seen.cursor, heartbeats=True) as resumed:
                assert summary([await next_event(resumed)]) == [(OUT, second.conversion_id)]
                third = await shop.convert(ALICE, DINER, 300)
                assert summary([await next_event(resumed)]) == [(OUT, third.conversion_id)]
                # A read that timed out (its task cancelled) leaves the stream usable, resuming from its cursor.
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(anext(resumed), 0.3)
                fourth = await shop.convert(ALICE, DINER, 50)
                assert summary([await next_event(resumed)]) == [(OUT, fourth.conversion_id)]

            with refused(errors.InvalidCursor, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CURSOR"):
                await anext(shop.events(cursor="not-a-cursor"))

    run(scenario)


def test_event_stream_reconnects_from_its_last_cursor_and_close_ends_it(hub: RunningHub) -> None:
    async def scenario() -> None:
        shop, diner = await pair(hub, issued=1_000)
        async with shop, diner, FaultyHop(hub.target) as hop:
            made = [await shop.convert(ALICE, DINER, p) for p in (100, 200)]
            hop.faults[STREAM] = [CUT_AFTER_EVENT]
            async with AsyncMerchantClient(hop.target, SHOP, shop.signer.private_key) as via_hop:
                stream = via_hop.events(cursor=FROM_START)
                got = [await next_event(stream), await next_event(stream)]
                assert summary(got) == [(OUT, c.conversion_id) for c in made], "each event once, in order"
                assert stream.reconnects == 1
                requests = [exchange_pb2.StreamEventsRequest.FromString(body) for body, _ in hop.calls[STREAM]]
                assert [r.cursor for r in requests] == [FROM_START, got[0].cursor]

                # close() from another task ends a pending read: the iteration stops, nothing raised.
                reader = asyncio.ensure_future(anext(stream, None))
                await asyncio.sleep(0.3)
                assert not reader.done()
                stream.close()
                assert await asyncio.wait_for(reader, WAIT_S) is None
                assert await anext(stream, None) is None

                # Closing the client ends its streams too.
                other = via_hop.events(cursor=got[-1].cursor)
                pending = asyncio.ensure_future(anext(other, None))
                await asyncio.sleep(0.3)
                await via_hop.close()
                assert await asyncio.wait_for(pending, WAIT_S) is None

    run(scenario)


# --- statements ----------------------------------------------------------------------------------------------


def test_statements_list_get_items_verify_acknowledge_dispute(hub: RunningHub) -> None:
    async def scenario() -> None:
        shop, diner = await pair(hub, issued=10_000)
        async with shop, diner:
            made = [await shop.convert(ALICE, DINER, p) for p in (1_234, 500, 77)]
            await asyncio.sleep(0.01)  # the cutoff falls after the last conversion
            cycle = await operator(hub, lambda op: op.close_cycle("CNY"))
            info = await shop.get_network_info()
            hub_keys = {k.key_id: bytes(k.public_key) for k in info.hub_keys}

            summaries = (await shop.list_statements_page()).statements
            assert [(s.cycle_id, s.net.micros, s.acknowledged) for s in summaries] == [
                (cycle.cycle_id, -sum(c.src_cash.micros for c in made), False)
            ]
            envelope = await shop.get_statement(cycle.cycle_id)
            items = [i async for i in shop.iter_statement_items(cycle.cycle_id, page_size=2)]  # two pages
            assert {(i.operation_id, i.direction, i.counterparty, i.points, i.cash_micros) for i in items} == {
                (c.conversion_id, "out", DINER, c.src_points, c.src_cash.micros) for c in made
            }
            verified = verify_statement(envelope, hub_keys, items)
            assert verified.items_checked and verified.cycle_id == cycle.cycle_id
            async with shop.events(cursor=FROM_START) as stream:
                while (event := await next_event(stream)).type != STATEMENT_READY:
                    pass
            assert (event.cycle_id, event.merchant_id) == (cycle.cycle_id, SHOP)

            ack = await shop.acknowledge_statement(cycle.cycle_id, bytes(envelope.statement_json))
            assert (ack.cycle_id, ack.merchant_id, ack.key_id) == (cycle.cycle_id, SHOP, shop.key_id)
            again = await shop.acknowledge_statement(cycle.cycle_id, bytes(envelope.statement_json))
            assert again.acknowledged_at == ack.acknowledged_at
            theirs = await diner.get_statement(cycle.cycle_id)
            with refused(errors.BadStatementSignature, grpc.StatusCode.INVALID_ARGUMENT, "BAD_STATEMENT_SIGNATURE"):
                await diner.acknowledge_statement(cycle.cycle_id, bytes(theirs.statement_json) + b" ")

            dispute = await shop.dispute_item(cycle.cycle_id, made[1].conversion_id, "member says never asked")
            assert (dispute.merchant_id, dispute.operation_id) == (SHOP, made[1].conversion_id)
            assert dispute.status == clearing_pb2.DISPUTE_STATUS_OPEN
            with refused(errors.DisputeExists, grpc.StatusCode.ALREADY_EXISTS, "DISPUTE_EXISTS"):
                await shop.dispute_item(cycle.cycle_id, made[1].conversion_id, "again")
            (summary_now,) = (await shop.list_statements_page()).statements
            assert summary_now.acknowledged and summary_now.open_disputes == 1

    run(scenario)


# --- credentials, keys, merchant profile, TLS --------------------------------------------------------------


def test_key_file_environment_keys_and_profile(
    hub: RunningHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = admit(hub, SHOP)
    admit(hub, DINER, value_micros=20_000)
    (tmp_path / "shop.key").write_bytes(private_key_pem(key))
    monkeypatch.setenv("POINTSX_TARGET", hub.target)
    monkeypatch.setenv("POINTSX_MERCHANT_ID", SHOP)
    monkeypatch.setenv("POINTSX_KEY_FILE", str(tmp_path / "shop.key"))
    new_key = Ed25519PrivateKey.generate()

    async def scenario() -> None:
        async with (
            AsyncMerchantClient.from_key_file(hub.target, SHOP, tmp_path / "shop.key", timeout_s=5) as from_file,
            AsyncMerchantClient.from_env() as from_env,
        ):
            info = await from_env.get_network_info()
            assert info.hub_keys and info.notice_period.seconds == hub.config.notice_period_s
            me = await from_file.get_merchant()
            assert (me.merchant_id, [k.key_id for k in me.keys]) == (SHOP, [from_file.key_id])
            other = await from_env.get_merchant(DINER)
            assert other.point_value.value_micros == 20_000 and list(other.keys) == []

            later = datetime.now(UTC) + timedelta(days=2)
            scheduled = await from_file.schedule_point_value(12_000, later)
            assert [v.value_micros for v in scheduled.scheduled_values] == [12_000]
            with refused(errors.NoticePeriodTooShort, FAILED_PRECONDITION, "NOTICE_PERIOD_TOO_SHORT"):
                await from_file.schedule_point_value(13_000, datetime.now(UTC) + timedelta(hours=1))

            added = await from_file.add_key(new_key)
            async with AsyncMerchantClient(hub.target, SHOP, new_key) as rotated:
                assert (await rotated.revoke_key(from_file.key_id)).status == common_pb2.KEY_STATUS_REVOKED
                assert [
                    k.key_id for k in (await rotated.get_merchant()).keys if k.status == common_pb2.KEY_STATUS_ACTIVE
                ] == [added.key_id]
            with refused(errors.KeyRevoked, grpc.StatusCode.UNAUTHENTICATED, "KEY_REVOKED"):
                await from_env.get_merchant()

    run(scenario)


def test_a_client_belongs_to_the_event_loop_it_first_ran_in(hub: RunningHub) -> None:
    client = AsyncMerchantClient(hub.target, SHOP, admit(hub, SHOP))  # made outside any loop: fine

    async def first_loop() -> str:
        try:
            return (await client.get_merchant()).merchant_id
        finally:
            await client.close()

    assert asyncio.run(first_loop()) == SHOP
    with pytest.raises(RuntimeError, match="another event loop"):
        asyncio.run(client.get_merchant())


@pytest.mark.parametrize("require_client_cert", [False, True])
def test_async_client_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, require_client_cert: bool) -> None:
    ca_key, ca_cert, ca_path = _ca(tmp_path)
    server_cert, server_key = _issue(tmp_path, "hub", ca_key, ca_cert)
    client_cert, client_key = _issue(tmp_path, "brew-client", ca_key, ca_cert)
    with_cert = TlsOptions(ca_bundle=ca_path, client_cert=client_cert, client_key=client_key)
    key = Ed25519PrivateKey.generate()
    (tmp_path / "brew.key").write_bytes(private_key_pem(key))
    cfg = init_data_dir(tmp_path / "data")
    tls_files = TlsFiles(server_cert, server_key, ca_path if require_client_cert else None)
    background = BackgroundHub(open_hub(cfg), "localhost:0", tls=tls_files)
    for name, value in (("TARGET", background.target), ("MERCHANT_ID", "brew"), ("KEY_FILE", tmp_path / "brew.key")):
        monkeypatch.setenv(f"POINTSX_{name}", str(value))
    monkeypatch.setenv("POINTSX_CA_BUNDLE", str(ca_path))  # TLS from the environment: the CA bundle alone

    async def scenario() -> None:
        brew_key = tmp_path / "brew.key"
        async with AsyncMerchantClient.from_key_file(background.target, "brew", brew_key, tls=with_cert) as client:
            await client.enroll_member("alice")
            assert (await client.issue_points("alice", 5)).balance_points == 5
        async with AsyncMerchantClient.from_env(max_attempts=1, timeout_s=3) as no_cert:
            if require_client_cert:
                with pytest.raises(errors.PointsxError):
                    await no_cert.get_balance("alice")
            else:
                assert (await no_cert.get_balance("alice")).points == 5

    try:
        with OperatorClient(background.target, load_key(cfg.operator_key_path), tls=with_cert) as op:
            op.register_merchant("brew", "Brew", "CNY", 10_000, public_key_bytes(key.public_key()))
        run(scenario)
    finally:
        background.stop()
