"""Clearing under faults: conversions keep flowing while a cycle closes, and the closer is killed.

A real `pointsx serve` with POINTSX_FAULT_CLEARING_CRASH_AT kills itself (SIGKILL) inside the
closing transaction while three clients are converting; a new hub on the same database closes the
same cutoff, the clients convert on, and a second cycle closes. Then every conversion the clients
were told of is in exactly one cycle, every conversion stored at all is in at most one, the
cycles' payables add up to what was converted, and the auditor passes — on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.config import load_key
from exchange.operator_client import OperatorClient
from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk.signing import public_key_bytes
from tests.auditor import check_invariants, cycle_of_operations
from tests.integration.test_clearing import BIG_CAP, wall_ms
from tests.integration.test_clearing_crash import engine_on, new_data_dir, serving

VALUES = {"alpha": 10_000, "beta": 30_000}
CLIENTS = 3


def _convert_until(target: str, key: Ed25519PrivateKey, n: int, stop: threading.Event,
                   done: list[exchange_pb2.Conversion]) -> None:  # fmt: skip
    with MerchantClient(target, "alpha", key, max_attempts=1, timeout_s=5) as client:
        while not stop.is_set():
            try:
                done.append(client.convert(f"ann{n}", "beta", 100))
            except errors.PointsxError:  # the hub died under it: unacknowledged, checked below
                return


def _flow(
    target: str, key: Ed25519PrivateKey, done: list[exchange_pb2.Conversion]
) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [threading.Thread(target=_convert_until, args=(target, key, n, stop, done)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    return stop, threads


@pytest.mark.timeout(180)
def test_a_closer_killed_amid_conversions_leaves_each_conversion_in_one_cycle(
    tmp_path: Path, database_url: str | None
) -> None:
    data = new_data_dir(tmp_path)
    keys = {m: Ed25519PrivateKey.generate() for m in VALUES}
    acknowledged: list[exchange_pb2.Conversion] = []
    with serving(data, database_url, crash_at="statements") as hub:
        with OperatorClient(hub.target, load_key(data / "operator.key")) as op:
            for m, value in VALUES.items():
                op.register_merchant(m, m.title(), "CNY", value, public_key_bytes(keys[m].public_key()),
                                     net_debit_cap_micros=BIG_CAP)  # fmt: skip
        alpha, beta = (MerchantClient(hub.target, m, keys[m]) for m in VALUES)
        for n in range(CLIENTS):
            alpha.enroll_member(f"ann{n}")
            alpha.issue_points(f"ann{n}", 1_000_000)
            beta.enroll_member(f"ann{n}")
            beta.redeem_link_code(f"ann{n}", alpha.create_link_code(f"ann{n}").code)
        alpha.set_route("beta", "outbound")
        beta.set_route("alpha", "inbound")
        alpha.close()
        beta.close()
        stop, threads = _flow(hub.target, keys["alpha"], acknowledged)
        time.sleep(0.5)
        cutoff = wall_ms() - 100
        with OperatorClient(hub.target, load_key(data / "operator.key")) as op, pytest.raises(errors.TransientError):
            op.close_cycle("CNY", cutoff)  # the hub kills itself inside the close
        hub.wait_killed()
        stop.set()
        for thread in threads:
            thread.join(30)
    before_restart = len(acknowledged)
    assert before_restart > 0, "scenario premise: conversions acknowledged while the close began"

    with serving(data, database_url) as hub:
        with OperatorClient(hub.target, load_key(data / "operator.key")) as op:
            first = op.close_cycle("CNY", cutoff)  # the killed close, completed
            stop, threads = _flow(hub.target, keys["alpha"], acknowledged)
            time.sleep(0.5)
            second = op.close_cycle("CNY")  # while conversions flow
            stop.set()
            for thread in threads:
                thread.join(30)
            time.sleep(0.01)
            third = op.close_cycle("CNY")  # whatever was still open
        hub.stop()
    assert len(acknowledged) > before_restart
    with engine_on(data, database_url) as engine:
        with engine.connect() as conn:
            cycle_of = cycle_of_operations(conn)  # raises if any is in two; checks counts per cycle
        check_invariants(engine)
    ids = {int(c.conversion_id[3:]) for c in acknowledged}
    assert all(cycle_of[seq] is not None for seq in ids), "an acknowledged conversion in no cycle"
    assert sum(c.operation_count for c in (first, second, third)) == len(cycle_of)
    payable = sum(p.payable_micros for c in (first, second, third) for p in c.positions if p.merchant_id == "alpha")
    stored_cash = sum(c.src_cash.micros for c in acknowledged)
    assert payable >= stored_cash, "the cycles hold at least every acknowledged conversion"
