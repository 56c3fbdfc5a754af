"""`pointsx serve --workers N` (exchange/workers.py): N hub processes on one port over one PostgreSQL.

Several clients, each on a connection of its own, convert at once through two workers; a worker
killed with SIGKILL is restarted and the port keeps serving; SIGTERM stops every process; one
worker alone runs the clearing schedule; and the auditor passes over the database afterwards.
SQLite and port 0 are refused with the reason.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.config import init_data_dir, load_key
from exchange.operator_client import OperatorClient
from exchange.store.engine import make_engine
from merchant_sdk import MerchantClient
from merchant_sdk._pb.pointsx.v1 import exchange_pb2
from merchant_sdk.signing import public_key_bytes
from tests import harness
from tests.auditor import check_invariants
from tests.integration.test_clearing import BIG_CAP
from tests.integration.test_cli import POINTSX, free_port, run, wait_serving

CLIENTS = 6


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture
def postgres_url() -> Iterator[str]:
    url, name = harness.fresh_postgres_database()
    try:
        yield url
    finally:
        harness.drop_postgres_database(name)


def test_two_workers_share_the_port_survive_a_kill_and_stop_together(tmp_path: Path, postgres_url: str) -> None:
    data = init_data_dir(tmp_path / "data").data_dir
    target = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        supervisor = subprocess.Popen(
            [*POINTSX, "serve", "--data-dir", str(data), "--listen", target, "--database-url", postgres_url,
             "--workers", "2"], stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_serving(target)
        deadline = time.monotonic() + 30
        while f"serving on {target} with 2 workers" not in log_path.read_text():
            assert supervisor.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        workers = children(supervisor.pid)
        assert len(workers) == 2, workers

        keys = {m: Ed25519PrivateKey.generate() for m in ("alpha", "beta")}
        with OperatorClient(target, load_key(data / "operator.key")) as op:
            for m, key in keys.items():
                op.register_merchant(m, m.title(), "CNY", 10_000, public_key_bytes(key.public_key()),
                                     net_debit_cap_micros=BIG_CAP)  # fmt: skip
        setup = {m: MerchantClient(target, m, key) for m, key in keys.items()}
        for n in range(CLIENTS):
            setup["alpha"].enroll_member(f"ann{n}")
            setup["alpha"].issue_points(f"ann{n}", 10_000)
            setup["beta"].enroll_member(f"ann{n}")
            setup["beta"].redeem_link_code(f"ann{n}", setup["alpha"].create_link_code(f"ann{n}").code)
        setup["alpha"].set_route("beta", "outbound")
        setup["beta"].set_route("alpha", "inbound")

        done: list[exchange_pb2.Conversion] = []

        def convert(n: int) -> None:
            with MerchantClient(target, "alpha", keys["alpha"]) as client:  # a connection of its own
                done.extend(client.convert(f"ann{n}", "beta", 100) for _ in range(10))

        threads = [threading.Thread(target=convert, args=(n,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        os.kill(workers[1], signal.SIGKILL)  # mid-traffic: its clients' retries reach the survivor
        for thread in threads:
            thread.join(60)
        assert len(done) == CLIENTS * 10 and len({c.conversion_id for c in done}) == CLIENTS * 10
        deadline = time.monotonic() + 30
        while len(children(supervisor.pid)) < 2 or "restarting it" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        for n in range(CLIENTS):
            assert setup["alpha"].get_balance(f"ann{n}").points == 10_000 - 10 * 100
            assert setup["beta"].get_balance(f"ann{n}").points == 10 * 100 * 10_000 * 99 // 100 // 10_000
        for client in setup.values():
            client.close()

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        assert all(not Path(f"/proc/{pid}").exists() for pid in children(supervisor.pid))
        output = log_path.read_text()
        assert output.count("clearing scheduled by cron") == 1 + output.count("worker 1 exited"), output
    finally:
        if supervisor.poll() is None:
            for pid in children(supervisor.pid):
                os.kill(pid, signal.SIGKILL)
            supervisor.kill()
            supervisor.wait()
    engine = make_engine(postgres_url)
    try:
        check_invariants(engine)
    finally:
        engine.dispose()


def test_workers_need_postgresql_and_a_fixed_port(tmp_path: Path) -> None:
    data = init_data_dir(tmp_path / "data").data_dir
    out = run("serve", "--data-dir", str(data), "--workers", "2", check=False)
    assert out.returncode == 1 and "--workers needs PostgreSQL" in out.stderr, out.stderr
    out = run("serve", "--data-dir", str(data), "--workers", "2", "--listen", "127.0.0.1:0",
              "--database-url", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres", check=False)  # fmt: skip
    assert out.returncode == 1 and "fixed port" in out.stderr, out.stderr
