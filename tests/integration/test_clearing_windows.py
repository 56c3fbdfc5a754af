"""Cycles clear stamped windows behind a fence (exchange/store/fences.py): exactly once, always.

- A hub whose clock is behind (another process, a skewed host) cannot slip an operation into a
  closed window: its conversion and its reversal are stamped at the fence and land in the next
  cycle; the closed cycle reads back unchanged.
- Conversions keep flowing from several threads while the operator closes cycle after cycle:
  every acknowledged conversion is an item of exactly one cycle, on SQLite and on PostgreSQL, and
  the cycles' payables add up to exactly what was converted.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2, operator_pb2
from tests.harness import RunningHub
from tests.integration.test_clearing import BIG_CAP, CNY_STEP, Book, assert_cycle, network_on, positions

MERCHANTS = {"alpha": 10_000, "beta": 50_000, "gamma": 2_000}


def test_a_clock_behind_the_fence_lands_in_the_next_cycle(tmp_path: Path, database_url: str | None) -> None:
    with network_on(tmp_path, database_url) as net:
        for merchant_id, value in list(MERCHANTS.items())[:2]:
            net.merchant(merchant_id, value, issued=100_000)
        net.link("alpha", "beta")
        net.route("alpha", "beta")
        first, second = Book(), Book()
        converted = net.convert(first, "alpha", "beta", 1_000)
        net.clock.advance(10)
        cycle1 = net.close_cycle("CNY")
        cutoff = cycle1.cutoff.ToMilliseconds()
        carries = assert_cycle(cycle1, first, {}, CNY_STEP)

        net.clock.advance(-60_000)  # this hub's clock is now a minute behind the cutoff
        late = net.clients["alpha"].convert(net.ref("alpha"), "beta", 500)
        assert late.created_at.ToMilliseconds() == cutoff, "stamped at the fence, not in the closed window"
        second.conversion(late)
        with net.running.operator() as op:
            reversal = op.reverse_conversion(converted.conversion_id, reason="late reversal")
        second.reversal(converted, reversal)

        again = net.get_cycle(cycle1.cycle_id)
        assert (again.operation_count, positions(again)) == (cycle1.operation_count, positions(cycle1))
        closed_items = {i.operation_id for i in net.clients["alpha"].iter_statement_items(cycle1.cycle_id)}
        assert closed_items == {converted.conversion_id}

        net.clock.advance(120_000)
        cycle2 = net.close_cycle("CNY")
        assert cycle2.period_start.ToMilliseconds() == cutoff
        assert_cycle(cycle2, second, carries, CNY_STEP)
        next_items = {i.operation_id for i in net.clients["alpha"].iter_statement_items(cycle2.cycle_id)}
        assert next_items == second.operation_ids() and late.conversion_id in next_items


def _trade(
    client: MerchantClient,
    merchant_id: str,
    stop: threading.Event,
    done: list[exchange_pb2.Conversion],
    seed: int,
) -> None:
    rng = random.Random(seed)
    partners = [m for m in MERCHANTS if m != merchant_id]
    while not stop.is_set():
        try:
            done.append(client.convert(f"ann-{merchant_id}", rng.choice(partners), rng.randint(50, 500)))
        except errors.PointsxError as refusal:  # only a clean refusal is acceptable, and none is expected
            raise AssertionError(f"{merchant_id}: {refusal.reason}") from refusal


def test_conversions_flowing_while_cycles_close_each_land_in_exactly_one_cycle(hub: RunningHub) -> None:
    clients: dict[str, MerchantClient] = {}
    for merchant_id, value in MERCHANTS.items():
        client, _key = hub.admit(merchant_id, value_micros=value, cap_micros=BIG_CAP)
        clients[merchant_id] = client
        client.enroll_member(f"ann-{merchant_id}")
        client.issue_points(f"ann-{merchant_id}", 10**9)
    for merchant_id in ("beta", "gamma"):
        code = clients["alpha"].create_link_code("ann-alpha").code
        clients[merchant_id].redeem_link_code(f"ann-{merchant_id}", code)
    for source in MERCHANTS:
        for destination in MERCHANTS:
            if source != destination:
                clients[source].set_route(destination, "outbound")
                clients[destination].set_route(source, "inbound")

    stop = threading.Event()
    done: dict[str, list[exchange_pb2.Conversion]] = {m: [] for m in MERCHANTS}
    workers = [
        threading.Thread(target=_trade, args=(clients[m], m, stop, done[m], n), daemon=True)
        for n, m in enumerate(MERCHANTS)
    ]
    cycles: list[operator_pb2.Cycle] = []
    with hub.operator() as op:
        for worker in workers:
            worker.start()
        try:
            for _ in range(5):
                time.sleep(0.2)
                cycles.append(op.close_cycle("CNY"))
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
        time.sleep(0.01)
        cycles.append(op.close_cycle("CNY"))  # whatever was still open

    acknowledged = [conv for convs in done.values() for conv in convs]
    assert len(acknowledged) > 20, "scenario premise: conversions while cycles close"
    assert sum(c.operation_count for c in cycles) == len(acknowledged)
    seen: Counter[str] = Counter()
    payable: dict[str, int] = defaultdict(int)
    for cycle in cycles:
        for merchant_id, row in positions(cycle).items():
            payable[merchant_id] += row.payable
        for merchant_id, client in clients.items():
            for item in client.iter_statement_items(cycle.cycle_id) if merchant_id in positions(cycle) else ():
                if item.direction == "out":
                    seen[item.operation_id] += 1
    assert {conv.conversion_id for conv in acknowledged} == set(seen), "every conversion in a cycle"
    assert set(seen.values()) == {1}, "no conversion in two cycles"
    for merchant_id in MERCHANTS:
        converted = sum(c.src_cash.micros for c in done[merchant_id])
        assert payable[merchant_id] == converted, merchant_id
    for client in clients.values():
        client.close()
