"""The operator's path through the real command line: init, serve, keygen, admit, suspend, audit."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from merchant_sdk import MerchantClient, errors
from tests import harness

POINTSX = [sys.executable, "-m", "exchange.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*POINTSX, *args], capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"pointsx {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(target: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)


@pytest.fixture
def served(tmp_path: Path, database_url: str | None) -> Iterator[tuple[Path, str]]:
    data = tmp_path / "data"
    run("init", "--data-dir", str(data))
    assert oct((data / "hub.key").stat().st_mode & 0o777) == "0o600"
    assert oct((data / "operator.key").stat().st_mode & 0o777) == "0o600"
    target = f"127.0.0.1:{free_port()}"
    args = ["serve", "--data-dir", str(data), "--listen", target]
    if database_url:
        args += ["--database-url", database_url]
    proc = subprocess.Popen([*POINTSX, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_serving(target)
        yield data, target
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output


def test_operator_admits_and_suspends_a_merchant(served: tuple[Path, str], tmp_path: Path) -> None:
    data, target = served
    keygen = json.loads(run("keygen", "--out", str(tmp_path / "brew.key"), "--json").stdout)
    assert len(keygen["key_id"]) == 16
    hub = ["--data-dir", str(data), "--hub", target]
    out = run(
        "operator", "register-merchant", *hub, "--id", "brew", "--name", "Brew & Co.", "--currency", "CNY",
        "--point-value", "0.01", "--public-key", keygen["public_key_file"], "--net-debit-cap", "5000",
        "--iban", "CN00TEST0001", "--bic", "TESTCNSH", "--json",
    )  # fmt: skip
    merchant = json.loads(out.stdout)
    assert merchant["point_value"]["value_micros"] == "10000"
    assert merchant["net_debit_cap"]["micros"] == "5000000000"
    assert merchant["keys"][0]["key_id"] == keygen["key_id"]

    client = MerchantClient.from_key_file(target, "brew", tmp_path / "brew.key")
    client.enroll_member("alice")
    assert client.issue_points("alice", 100).balance_points == 100

    run("operator", "suspend-merchant", *hub, "--id", "brew", "--reason", "compliance review")
    with pytest.raises(errors.MerchantSuspended):
        client.issue_points("alice", 100)
    run("operator", "reactivate-merchant", *hub, "--id", "brew")
    assert client.issue_points("alice", 1).balance_points == 101
    client.close()

    listed = json.loads(run("operator", "list-merchants", *hub, "--json").stdout)
    assert [m["merchant_id"] for m in listed] == ["brew"]
    refused = run("operator", "register-merchant", *hub, "--id", "Bad Id", "--name", "x", "--currency", "CNY",
                  "--point-value", "0.01", "--public-key", keygen["public_key_file"], check=False)  # fmt: skip
    assert refused.returncode == 1 and "INVALID_MERCHANT_ID" in refused.stderr


def test_stock_grpc_tools_see_every_service(served: tuple[Path, str]) -> None:
    _data, target = served
    with grpc.insecure_channel(target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        health = health_pb2_grpc.HealthStub(channel)
        for name in (
            "NetworkService",
            "MerchantService",
            "LedgerService",
            "ExchangeService",
            "ClearingService",
            "OperatorService",
        ):
            assert f"pointsx.v1.{name}" in services
            assert health.Check(health_pb2.HealthCheckRequest(service=f"pointsx.v1.{name}")).status == 1
        assert "grpc.health.v1.Health" in services


def test_audit_verify_reports_the_first_broken_record(tmp_path: Path) -> None:
    running = harness.RunningHub(tmp_path, None)
    try:
        client, _key = running.admit("brew")
        client.enroll_member("alice")
        for _ in range(3):
            client.issue_points("alice", 10)
        client.close()
    finally:
        running.stop()
    data = str(running.config.data_dir)
    ok = json.loads(run("audit", "verify", "--data-dir", data, "--json").stdout)
    assert ok == {"ok": True, "records": 5, "first_broken_seq": None, "problem": None}
    with sqlite3.connect(running.config.data_dir / "pointsx.db") as db:
        db.execute("UPDATE audit_log SET caller = 'mallory' WHERE seq = 3")
    broken = run("audit", "verify", "--data-dir", data, check=False)
    assert broken.returncode == 1
    assert "record 3" in broken.stderr


def test_serve_on_an_unmigrated_postgres_says_what_to_run(tmp_path: Path) -> None:
    name = f"pointsx_empty_{os.getpid()}"
    with harness._admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        run("init", "--data-dir", str(tmp_path / "d"))
        url = harness._url(name)
        result = run(
            "serve", "--data-dir", str(tmp_path / "d"), "--database-url", url, "--listen", "127.0.0.1:0", check=False
        )
        assert result.returncode == 1
        assert "pointsx migrate --database-url" in result.stderr
        assert "Migrating" not in result.stderr
        run("migrate", "--data-dir", str(tmp_path / "d"), "--database-url", url)
    finally:
        harness.drop_postgres_database(name)


def _admit(hub: list[str], tmp_path: Path, merchant_id: str, cap: str) -> MerchantClient:
    keygen = json.loads(run("keygen", "--out", str(tmp_path / f"{merchant_id}.key"), "--json").stdout)
    run("operator", "register-merchant", *hub, "--id", merchant_id, "--name", merchant_id.title(),
        "--currency", "CNY", "--point-value", "0.01", "--public-key", keygen["public_key_file"],
        "--net-debit-cap", cap)  # fmt: skip
    return MerchantClient.from_key_file(hub[-1], merchant_id, tmp_path / f"{merchant_id}.key")


def test_operator_sets_route_terms_and_reverses_a_conversion(served: tuple[Path, str], tmp_path: Path) -> None:
    data, target = served
    hub = ["--data-dir", str(data), "--hub", target]
    brew, sky = _admit(hub, tmp_path, "brew", "1000"), _admit(hub, tmp_path, "skyway", "0")
    brew.enroll_member("alice")
    sky.enroll_member("alice-s")
    sky.redeem_link_code("alice-s", brew.create_link_code("alice").code)
    brew.issue_points("alice", 1000)
    brew.set_route("skyway", "outbound")
    sky.set_route("brew", "inbound")

    terms = ["--source", "brew", "--destination", "skyway", "--fee-bps", "250", "--max-src-points", "500",
             "--daily-member-cap", "4.00"]  # fmt: skip
    route = json.loads(run("operator", "set-route-terms", *hub, *terms, "--json").stdout)
    assert (route["state"], route["fee_bps"], route["max_src_points"]) == ("ROUTE_STATE_OPEN", 250, "500")
    assert route["daily_member_cap"] == {"currency": "CNY", "micros": "4000000"}
    table = run("operator", "set-route-terms", *hub, *terms).stdout
    assert "250 bps" in table and "open" in table

    with pytest.raises(errors.AmountTooLarge):
        brew.convert("alice", "skyway", 501)
    conversion = brew.convert("alice", "skyway", 400)
    assert (conversion.dst_points, conversion.fee.micros) == (390, 100_000)
    with pytest.raises(errors.DailyLimitExceeded):
        brew.convert("alice", "skyway", 100)  # 4.00 + 1.00 passes the 4.00 daily cap

    out = run(
        "operator", "reverse-conversion", *hub, "--id", conversion.conversion_id, "--reason", "customer complaint"
    )
    assert f"conversion {conversion.conversion_id} reversed by op_" in out.stdout
    assert brew.get_balance("alice").points == 1000 and sky.get_balance("alice-s").points == 0
    again = run("operator", "reverse-conversion", *hub, "--id", conversion.conversion_id, check=False)
    assert again.returncode == 1 and "ALREADY_REVERSED" in again.stderr

    run("operator", "set-route-terms", *hub, "--source", "brew", "--destination", "skyway", "--close")
    with pytest.raises(errors.RouteClosed):
        brew.convert("alice", "skyway", 10)
    brew.close()
    sky.close()


def test_unreachable_hub_is_reported_as_such(tmp_path: Path) -> None:
    data = tmp_path / "data"
    run("init", "--data-dir", str(data))
    out = run("operator", "list-merchants", "--data-dir", str(data), "--hub", f"127.0.0.1:{free_port()}", check=False)
    assert out.returncode == 1 and "could not reach the hub" in out.stderr


def test_error_messages_keep_their_brackets(tmp_path: Path) -> None:
    """Errors are printed as text, not as rich markup that would swallow `[settlement]` or `[bad]`."""
    run("init", "--data-dir", str(tmp_path / "data"))
    out = run("clearing", "close", "--data-dir", str(tmp_path / "data"), "--currency", "CNY", "--cutoff", "[bad]",
              check=False)  # fmt: skip
    assert out.returncode == 1 and "--cutoff '[bad]' is not an ISO 8601 instant" in out.stderr, out.stderr
