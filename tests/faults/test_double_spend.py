"""Double spend: 50 debits at once against one balance B, each of `a` points — exactly ⌊B/a⌋ go through.

Every other is refused INSUFFICIENT_POINTS (FAILED_PRECONDITION), the balance ends at B - ⌊B/a⌋·a,
each success saw a distinct balance, and the destination of conversions gets exactly what the
successes converted. tests/integration/test_concurrency.py races 32 redeems on PostgreSQL only and
tests/integration/test_conversion_concurrency.py races conversions one client per thread; here:

- 50 redeems, and 50 conversions, on SQLite and PostgreSQL, through ten clients with five calls
  each in flight on its one channel (HTTP/2 streams of one connection and several connections);
- 50 debits mixing redeems and conversions of the same member;
- two ConvertBatch calls of 25 items each, at once, for one member;
- 50 redeems at once through one AsyncMerchantClient;
- 50 redeems and 50 conversions through `pointsx serve --workers 2` on PostgreSQL, each call on a
  connection of its own, so the kernel spreads them over both hub processes.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

from exchange.config import load_key
from exchange.operator_client import OperatorClient
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2, ledger_pb2
from merchant_sdk.aio import AsyncMerchantClient
from merchant_sdk.signing import public_key_bytes
from tests.faults.conftest import WorkersHub
from tests.harness import RunningHub
from tests.integration.test_conversion_concurrency import BIG_CAP, VALUE, Expected, release

T = TypeVar("T")
ATTEMPTS = 50
BALANCE = 1_234
EACH = 37  # ⌊1234 / 37⌋ = 33 of the 50 go through
CLIENTS = 10  # x 5 calls in flight on each one's channel


def admitted(target: str, operator_key: Ed25519PrivateKey, *merchant_ids: str) -> dict[str, Ed25519PrivateKey]:
    keys = {m: Ed25519PrivateKey.generate() for m in merchant_ids}
    with OperatorClient(target, operator_key) as op:
        for m, key in keys.items():
            op.register_merchant(m, m.title(), "CNY", VALUE, public_key_bytes(key.public_key()),
                                 net_debit_cap_micros=BIG_CAP)  # fmt: skip
    return keys


def funded(target: str, keys: dict[str, Ed25519PrivateKey], shop: str, diner: str, points: int = BALANCE) -> None:
    """alice at `shop` holds `points`, linked to alice.d at `diner`, on an open route shop -> diner."""
    with MerchantClient(target, shop, keys[shop]) as s, MerchantClient(target, diner, keys[diner]) as d:
        s.set_route(diner, "outbound")
        d.set_route(shop, "inbound")
        s.enroll_member("alice")
        d.enroll_member("alice.d")
        d.redeem_link_code("alice.d", s.create_link_code("alice").code)
        s.issue_points("alice", points)


def spread(target: str, merchant_id: str, key: Ed25519PrivateKey, clients: int,
           jobs: list[Callable[[MerchantClient], T]]) -> list[T | errors.PointsxError]:  # fmt: skip
    """Every job at once, job i on client i % clients: several calls share each client's channel."""
    pool = [MerchantClient(target, merchant_id, key) for _ in range(clients)]
    try:
        return release([functools.partial(job, pool[i % clients]) for i, job in enumerate(jobs)])
    finally:
        for client in pool:
            client.close()


def assert_spent_once(outcomes: list[Message | errors.PointsxError], *, balance: int = BALANCE) -> list[Message]:
    done = [o for o in outcomes if not isinstance(o, errors.PointsxError)]
    refused = [o for o in outcomes if isinstance(o, errors.PointsxError)]
    assert len(done) == balance // EACH, f"{len(done)} debits of {EACH} went through on a balance of {balance}"
    for error in refused:
        assert isinstance(error, errors.InsufficientPoints), f"unexpected refusal {error!r}"
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "INSUFFICIENT_POINTS"
    return done


def check_redeems(outcomes: list[ledger_pb2.PointsMovement | errors.PointsxError], client: MerchantClient) -> None:
    done = assert_spent_once(list(outcomes))
    movements = [m for m in done if isinstance(m, ledger_pb2.PointsMovement)]
    # Each success saw its own balance right after it, none negative, each once.
    assert sorted(m.balance_points for m in movements) == [BALANCE - EACH * n for n in range(len(done), 0, -1)]
    assert len({m.operation_id for m in movements}) == len(done)
    assert client.get_balance("alice").points == BALANCE - len(done) * EACH


def check_conversions(
    outcomes: list[exchange_pb2.Conversion | errors.PointsxError], shop: MerchantClient, diner: MerchantClient
) -> None:
    done = assert_spent_once(list(outcomes))
    assert len({c.conversion_id for c in done if isinstance(c, exchange_pb2.Conversion)}) == len(done)
    assert shop.get_balance("alice").points == BALANCE - len(done) * EACH
    assert diner.get_balance("alice.d").points == len(done) * Expected(EACH).dst_points


def redeem(client: MerchantClient) -> ledger_pb2.PointsMovement:
    return client.redeem_points("alice", EACH)


def converter(destination: str = "diner") -> Callable[[MerchantClient], exchange_pb2.Conversion]:
    return lambda client: client.convert("alice", destination, EACH)


convert = converter()


@pytest.mark.timeout(90)
def test_fifty_redeems_at_once_spend_the_balance_once(hub: RunningHub) -> None:
    keys = admitted(hub.target, hub.operator_key, "shop", "diner")
    funded(hub.target, keys, "shop", "diner")
    outcomes = spread(hub.target, "shop", keys["shop"], CLIENTS, [redeem] * ATTEMPTS)
    with MerchantClient(hub.target, "shop", keys["shop"]) as shop:
        check_redeems(outcomes, shop)


@pytest.mark.timeout(90)
def test_fifty_conversions_at_once_spend_the_balance_once(hub: RunningHub) -> None:
    keys = admitted(hub.target, hub.operator_key, "shop", "diner")
    funded(hub.target, keys, "shop", "diner")
    outcomes = spread(hub.target, "shop", keys["shop"], CLIENTS, [convert] * ATTEMPTS)
    with (
        MerchantClient(hub.target, "shop", keys["shop"]) as shop,
        MerchantClient(hub.target, "diner", keys["diner"]) as diner,
    ):
        check_conversions(outcomes, shop, diner)


@pytest.mark.timeout(90)
def test_redeems_and_conversions_at_once_share_one_balance(hub: RunningHub) -> None:
    keys = admitted(hub.target, hub.operator_key, "shop", "diner")
    funded(hub.target, keys, "shop", "diner")
    jobs: list[Callable[[MerchantClient], Message]] = [redeem if i % 2 else convert for i in range(ATTEMPTS)]
    outcomes = spread(hub.target, "shop", keys["shop"], CLIENTS, jobs)
    done = assert_spent_once(outcomes)
    converted = sum(isinstance(o, exchange_pb2.Conversion) for o in done)
    with (
        MerchantClient(hub.target, "shop", keys["shop"]) as shop,
        MerchantClient(hub.target, "diner", keys["diner"]) as diner,
    ):
        assert shop.get_balance("alice").points == BALANCE - len(done) * EACH
        assert diner.get_balance("alice.d").points == converted * Expected(EACH).dst_points


@pytest.mark.timeout(90)
def test_two_batches_at_once_spend_the_balance_once(hub: RunningHub) -> None:
    keys = admitted(hub.target, hub.operator_key, "shop", "diner")
    funded(hub.target, keys, "shop", "diner")

    def batch(client: MerchantClient) -> list[exchange_pb2.Conversion | errors.PointsxError]:
        items = [client.conversion_request("alice", "diner", EACH) for _ in range(ATTEMPTS // 2)]
        results = client.convert_batch(items).results
        return [r.conversion if r.HasField("conversion") else errors.from_status(r.error) for r in results]

    outcomes = spread(hub.target, "shop", keys["shop"], 2, [batch, batch])
    items = [item for o in outcomes if isinstance(o, list) for item in o]
    assert len(items) == ATTEMPTS, f"a batch failed as a whole: {outcomes}"
    with (
        MerchantClient(hub.target, "shop", keys["shop"]) as shop,
        MerchantClient(hub.target, "diner", keys["diner"]) as diner,
    ):
        check_conversions(items, shop, diner)


@pytest.mark.timeout(90)
def test_fifty_redeems_at_once_through_one_async_client(hub: RunningHub) -> None:
    keys = admitted(hub.target, hub.operator_key, "shop", "diner")
    funded(hub.target, keys, "shop", "diner")

    async def race() -> list[ledger_pb2.PointsMovement | errors.PointsxError]:
        async with AsyncMerchantClient(hub.target, "shop", keys["shop"]) as client:
            got = await asyncio.gather(*(client.redeem_points("alice", EACH) for _ in range(ATTEMPTS)),
                                       return_exceptions=True)  # fmt: skip
        for outcome in got:
            if not isinstance(outcome, ledger_pb2.PointsMovement | errors.PointsxError):
                raise AssertionError(f"not an answer: {outcome!r}")
        return [o for o in got if isinstance(o, ledger_pb2.PointsMovement | errors.PointsxError)]

    outcomes = asyncio.run(race())
    with MerchantClient(hub.target, "shop", keys["shop"]) as shop:
        check_redeems(outcomes, shop)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["redeem", "convert"])
def test_fifty_debits_through_two_worker_processes_spend_the_balance_once(workers_hub: WorkersHub, kind: str) -> None:
    target = workers_hub.process.target
    shop, diner = f"{kind}-shop", f"{kind}-diner"
    keys = admitted(target, load_key(workers_hub.process.data / "operator.key"), shop, diner)
    funded(target, keys, shop, diner)
    if kind == "redeem":
        outcomes: list[Message | errors.PointsxError] = list(
            spread(target, shop, keys[shop], ATTEMPTS, [redeem] * ATTEMPTS)
        )
        with MerchantClient(target, shop, keys[shop]) as client:
            check_redeems([o for o in outcomes if isinstance(o, ledger_pb2.PointsMovement | errors.PointsxError)],
                          client)  # fmt: skip
        return
    conversions = spread(target, shop, keys[shop], ATTEMPTS, [converter(diner)] * ATTEMPTS)
    with MerchantClient(target, shop, keys[shop]) as s, MerchantClient(target, diner, keys[diner]) as d:
        check_conversions(conversions, s, d)
