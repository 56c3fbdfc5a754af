"""Benchmark: hub conversion throughput and latency, against an echo server and pgbench on this machine.

What it measures, all in one run, one after the other on the same machine:

  hub      a real hub (`pointsx init` + `pointsx serve`, on SQLite or a fresh PostgreSQL database)
           with merchants admitted, members enrolled and linked, routes open and points issued
           through the SDK; then `--concurrency` calls kept in flight by `--clients` processes
           (asyncio + `AsyncMerchantClient`, one attempt per call), each a unary `Convert`
           (`--mode unary`) or a `ConvertBatch` of `--batch-size` items (`--mode batch`), for
           `--duration` s after `--warmup` s. Then (unless --no-half-load) the same again paced at
           half the calls/s just measured, where latency counts from each call's scheduled start.
  echo     a grpc.aio server on the same grpcio: a generic unary handler that returns the request
           bytes — no database, no auth — driven by the same clients sending the same signed bytes
           (a ConvertRequest, or in batch mode the whole ConvertBatchRequest) at the same
           concurrency; "echo + Ed25519 check" also verifies each call's signature as the hub does.
  pgbench  `pgbench -b tpcb-like` at the same concurrency on a fresh database (`-i -s --pgbench-scale`).

How to read it: calls/s is answered calls per second; conv/s counts converted items; p50 and p99
are per call, in ms. hub/echo shows what the ledger costs over the bare gRPC stack; conv/s ÷
pgbench tps shows how well the hub amortises commits (one tpcb-like transaction is about one
small ledger write). refused (the hub said no, with a reason) and errors (anything else) must be
0. The clients run on the same cores as the hub and the database: the CPU columns say how the
machine was shared in each measured window (in cores) — a server near 1.00 is bound by its one
Python process; "other" is the kernel and whatever else runs here, which disturbs the figures.
The hub's peak memory is sampled from /proc (its process and children: `--workers N`) through the
setup and both hub phases. The exit status is 1 when the hub refused or failed any call.
`--profile-hub FILE` runs the hub under cProfile in every thread (CPU time) for `pstats`.

    python scripts/bench_hub.py --database postgres --duration 20 --concurrency 16
    python scripts/bench_hub.py --database sqlite --mode batch --batch-size 1000 --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _bench_load as load
import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))

from exchange.operator_client import OperatorClient  # noqa: E402
from merchant_sdk import MerchantClient, load_private_key, load_private_key_file  # noqa: E402
from merchant_sdk.signing import private_key_pem, public_key_bytes  # noqa: E402

console = Console(stderr=True)
PG = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
PG_ADMIN_DSN = f"host={PG['host']} port={PG['port']} user={PG['user']} dbname=postgres"
VALUE_MICROS = 10_000  # every merchant's point value: 0.01 CNY
ISSUED_POINTS = 10**11  # per member and merchant: no run converts that many away
NET_DEBIT_CAP_MICROS = 10**15  # the largest cap the hub takes: no conversion is refused for it


@dataclass
class Figures:
    """One row: rates over the measured window, per-call latency, outcomes, and CPU cores by process group."""

    calls_per_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int = 0
    items: int = 0
    refused: int = 0
    errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    cpu_cores: dict[str, float] = field(default_factory=dict)


# --- processes ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A fresh, empty database, dropped afterwards: yields its name."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class HubProcess:
    """`pointsx init` then `pointsx serve` as a child process, waited for until health says SERVING."""

    def __init__(
        self, tmp: Path, database_url: str | None, workers: int, profile: str | None, write_batch_max: int | None
    ) -> None:
        pointsx = str(Path(sys.executable).with_name("pointsx"))
        self.data_dir = tmp / "hub"
        subprocess.run([pointsx, "init", "--data-dir", str(self.data_dir)], check=True, capture_output=True)
        config = self.data_dir / "config.toml"  # no clearing cutoff in the middle of a run (once a year)
        text = config.read_text().replace('cron = "0 0 * * *"', 'cron = "0 0 1 1 *"')
        if write_batch_max is not None:
            text = re.sub(r"(?m)^write_batch_max = \d+$", f"write_batch_max = {write_batch_max}", text)
        config.write_text(text)
        self.target = f"127.0.0.1:{_free_port()}"
        command = [pointsx, "serve", "--data-dir", str(self.data_dir), "--listen", self.target]
        command += ["--log-level", "warning"]
        if database_url:
            command += ["--database-url", database_url, "--migrate"]
        if workers > 1:  # only then: the flag is newer than this script
            command += ["--workers", str(workers)]
        if profile:  # every thread profiled: see _bench_load.profile_pointsx
            code = f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import _bench_load as b; "
            code += "sys.exit(b.profile_pointsx(sys.argv[1], sys.argv[2:]))"
            command = [sys.executable, "-c", code, profile, *command[1:]]
        self.log = tmp / "hub.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.memory = load.PeakRss(self.proc.pid)

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the hub exited with {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:  # SERVING
                        return
                time.sleep(0.1)
        raise RuntimeError(f"the hub was not SERVING within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> tuple[float, float]:
        """Stop the hub (SIGINT: a clean shutdown, so a profile is written); its peak RSS and PSS in MB."""
        hwm = load.rss_mb([self.proc.pid], "VmHWM")  # the main process's own peak, between samples too
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rss, pss = self.memory.stop()
        return max(rss, hwm), pss


# --- the network the load runs on -----------------------------------------------------------------


def build_network(target: str, operator_key: Ed25519PrivateKey, merchants: int, members: int) -> load.Network:
    """Merchants admitted (one currency, a cap nobody reaches), every route open both ways, and
    `members` people with an account at every merchant, all linked, each holding plenty of points."""
    keys = [Ed25519PrivateKey.generate() for _ in range(merchants)]
    ids = [f"bench{i}" for i in range(merchants)]
    with OperatorClient(target, operator_key) as op:
        for merchant_id, key in zip(ids, keys, strict=True):
            public_key = public_key_bytes(key.public_key())
            op.register_merchant(
                merchant_id,
                merchant_id.title(),
                "CNY",
                VALUE_MICROS,
                public_key,
                net_debit_cap_micros=NET_DEBIT_CAP_MICROS,
            )
    clients = [MerchantClient(target, mid, key) for mid, key in zip(ids, keys, strict=True)]
    refs = [f"member{i:05d}" for i in range(members)]

    def person(ref: str) -> None:
        for client in clients:
            client.enroll_member(ref)
            client.issue_points(ref, ISSUED_POINTS)
        for client in clients[1:]:
            client.redeem_link_code(ref, clients[0].create_link_code(ref).code)

    try:
        for s, source in enumerate(clients):
            for d, destination in enumerate(clients):
                if s != d:
                    source.set_route(ids[d], "outbound")
                    destination.set_route(ids[s], "inbound")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(person, refs))
    finally:
        for client in clients:
            client.close()
    return load.Network(tuple((mid, private_key_pem(key)) for mid, key in zip(ids, keys, strict=True)), tuple(refs))


# --- measuring --------------------------------------------------------------------------------------


def measure(label: str, target: str, kind: str, network: load.Network, shape: load.Shape, server_pid: int,
            database: str = "", rate: float = 0.0) -> Figures:  # fmt: skip
    """Run the clients against `target`, with the CPU of server, clients and PostgreSQL over the window."""
    cpu: dict[str, float] = {}
    followers: list[threading.Thread] = []

    def follow(t0: float, client_pids: list[int]) -> None:
        window = load.CpuWindow(lambda: {"server": load.process_tree(server_pid), "clients": client_pids,
                                         "postgres": load.postgres_pids(database)})  # fmt: skip

        def run() -> None:
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task(f"{label}: warm-up", total=shape.warmup_s + shape.duration_s)
                _sleep_until(t0 + shape.warmup_s, progress, task, t0)
                window.start()
                progress.update(task, description=f"{label}: measuring")
                _sleep_until(t0 + shape.warmup_s + shape.duration_s, progress, task, t0)
                cpu.update(window.stop())

        followers.append(threading.Thread(target=run, daemon=True))
        followers[-1].start()

    result = load.drive(load.specs(target, kind, network, shape, rate), follow)
    for follower in followers:
        follower.join(timeout=10)
    if result.failure:
        raise RuntimeError(f"{label}: {result.failure}")
    latencies, seconds = sorted(result.latencies_ms), shape.duration_s
    return Figures(result.calls / seconds, result.items / seconds, load.percentile(latencies, 0.50),
                   load.percentile(latencies, 0.99), result.calls, result.items, result.refused, result.errors,
                   dict(result.reasons.most_common(5)), cpu)  # fmt: skip


def _sleep_until(when: float, progress: Progress, task: TaskID, t0: float) -> None:
    while (left := when - time.monotonic()) > 0:
        time.sleep(min(0.2, left))
        progress.update(task, completed=time.monotonic() - t0)


Rows = dict[str, Figures | None]


def run_hub(args: argparse.Namespace, shape: load.Shape, tmp: Path) -> tuple[Rows, tuple[float, float], load.Network]:
    """The hub at full speed, then at half that pace; its peak memory through both."""
    with contextlib.ExitStack() as stack:
        url, name = None, ""
        if args.database == "postgres":
            name = stack.enter_context(postgres_database("pointsx_bench_hub"))
            url = f"postgresql+psycopg://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
        hub = HubProcess(tmp, url, args.workers, args.profile_hub, args.write_batch_max)
        try:
            hub.wait_serving()
            console.print(f"hub serving on {hub.target} ({args.database}); admitting merchants, enrolling members …")
            operator_key = load_private_key_file(hub.data_dir / "operator.key")
            network = build_network(hub.target, operator_key, args.merchants, args.members)
            kind = "convert" if args.mode == "unary" else "convert_batch"
            on = (hub.target, kind, network, shape, hub.proc.pid, name)
            full, half = measure(f"hub {kind}", *on), None
            if args.half_load and full.calls_per_s > 0:
                half = measure(f"hub {kind} @ {full.calls_per_s / 2:,.0f}/s", *on, rate=full.calls_per_s / 2)
        except BaseException:
            console.print(f"[red]hub log:[/]\n{hub.log_tail()}")
            raise
        finally:
            memory = hub.stop()
    return {"hub": full, "hub_half_load": half}, memory, network


def run_echo(network: load.Network, shape: load.Shape, verify: bool) -> Figures:
    keys = {mid: public_key_bytes(load_private_key(pem).public_key()) for mid, pem in network.merchants if verify}
    with load.echo_server(keys) as (target, pid):
        return measure("echo+auth" if verify else "echo", target, "echo", network, shape, pid)


def run_pgbench(args: argparse.Namespace, tmp: Path) -> Figures:
    """tpcb-like at the same concurrency; p50/p99 from pgbench's per-transaction log (-l)."""
    conn = ["-h", PG["host"], "-p", PG["port"], "-U", PG["user"]]
    seconds, jobs = max(1, round(args.duration)), min(args.concurrency, 2)
    with postgres_database("pointsx_bench_pgbench") as name:
        console.print(f"pgbench: initialising scale {args.pgbench_scale} …")
        init = [args.pgbench, "-i", "-q", "-s", str(args.pgbench_scale), *conn, name]
        subprocess.run(init, check=True, capture_output=True)
        run = f"-b tpcb-like -c {args.concurrency} -j {jobs} -T {seconds}"
        command = [args.pgbench, *run.split(), "-l", "--log-prefix", str(tmp / "pgbench_log"), *conn, name]
        window = load.CpuWindow(lambda: {"server": load.postgres_pids(name), "clients": load.pids_named("pgbench")})
        with Progress(console=console, transient=True) as progress:
            progress.add_task(f"pgbench {run}", total=None)
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(min(0.5, seconds / 4))  # connected: CPU is sampled while its backends live
            window.start()
            time.sleep(seconds * 0.75)
            cpu = window.stop()
            stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"pgbench failed ({proc.returncode}):\n{stderr}")
    found = re.search(r"^tps = ([\d.]+)", stdout, re.MULTILINE)
    if not found:
        raise RuntimeError(f"no tps in pgbench's output:\n{stdout}")
    latencies = sorted(int(line.split()[2]) / 1000.0 for log in tmp.glob("pgbench_log*") for line in log.open())
    failed = re.search(r"number of failed transactions: (\d+)", stdout)
    tps, p50, p99 = float(found.group(1)), load.percentile(latencies, 0.5), load.percentile(latencies, 0.99)
    failures = int(failed.group(1)) if failed else 0
    return Figures(tps, tps, p50, p99, len(latencies), len(latencies), errors=failures, cpu_cores=cpu)


# --- output ----------------------------------------------------------------------------------------

NAMES = {"hub": "hub", "hub_half_load": "hub @ 50% load", "echo": "echo", "echo_auth": "echo + Ed25519 check",
         "pgbench": "pgbench tpcb-like"}  # fmt: skip


def report(args: argparse.Namespace, rows: Rows, memory: tuple[float, float]) -> dict[str, object]:
    """The figures for machines: the configuration, every row, the ratios and the hub's peak memory."""

    def ratio(a: str, b: str, attr: str) -> float | None:
        top, bottom = rows.get(a), rows.get(b)
        return float(getattr(top, attr)) / bottom.calls_per_s if top and bottom and bottom.calls_per_s else None

    keys = ("database", "mode", "batch_size", "concurrency", "duration", "warmup", "clients", "workers", "merchants")
    config = {k: getattr(args, k) for k in (*keys, "members", "src_points")} | {"cpus": os.cpu_count()}
    ratios = {
        "hub_calls_per_echo_calls": ratio("hub", "echo", "calls_per_s"),
        "hub_calls_per_echo_auth_calls": ratio("hub", "echo_auth", "calls_per_s"),
        "hub_conversions_per_pgbench_tps": ratio("hub", "pgbench", "items_per_s"),
    }
    figures = {k: asdict(v) if (v := rows.get(k)) else None for k in NAMES}
    memory_mb = {"hub_peak_rss_mb": round(memory[0], 1), "hub_peak_pss_mb": round(memory[1], 1)}
    return {"config": config, **figures, "ratios": ratios, **memory_mb}


def print_tables(args: argparse.Namespace, rows: Rows, figures: dict[str, object]) -> None:
    out = Console()
    what = f"ConvertBatch ×{args.batch_size}" if args.mode == "batch" else "unary Convert"
    title = f"{args.database}, {what}, {args.concurrency} in flight from {args.clients} client processes"
    table = Table("", "calls/s", "conv/s", "p50 ms", "p99 ms", "refused", "errors", "CPU: server", "clients",
                  "postgres", "other", title=f"{title}, {args.duration:g} s each")  # fmt: skip
    for key, name in NAMES.items():
        if (row := rows.get(key)) is not None:
            cpu = [f"{row.cpu_cores.get(g, 0):.2f}" for g in ("server", "clients", "postgres", "other")]
            items = f"{row.items_per_s:,.0f}" if key.startswith("hub") else ""
            latency = [f"{row.p50_ms:.2f}", f"{row.p99_ms:.2f}"]
            rate = f"{row.calls_per_s:,.{0 if row.calls_per_s >= 100 else 1}f}"
            table.add_row(name, rate, items, *latency, str(row.refused), str(row.errors), *cpu)
    out.print(table)
    ratios, half = figures["ratios"], rows["hub_half_load"]
    assert isinstance(ratios, dict)
    checks = Table("figure", "value", "target", title="ratios and targets")
    for label, value, target, ok in [
        ("hub calls/s ÷ echo calls/s", ratios["hub_calls_per_echo_calls"], "≥ 0.6 (unary)", lambda v: v >= 0.6),
        ("hub calls/s ÷ echo+auth calls/s", ratios["hub_calls_per_echo_auth_calls"], "", None),
        ("hub conv/s ÷ pgbench tps", ratios["hub_conversions_per_pgbench_tps"], "≥ 10 (batch)", lambda v: v >= 10),
        ("hub p99 at 50% load, ms", half.p99_ms if half else None, "< 25", lambda v: v < 25),
        ("hub peak RSS, MB (summed over its processes)", figures["hub_peak_rss_mb"], "< 300", lambda v: v < 300),
        ("hub peak PSS, MB (shared pages counted once)", figures["hub_peak_pss_mb"], "", None),
    ]:
        if value is not None:
            met = "" if ok is None else (" [green]met[/]" if ok(value) else " [red]missed[/]")
            checks.add_row(label, f"{value:,.2f}", target + met)
    out.print(checks)
    if (hub := rows["hub"]) and hub.reasons:
        out.print(f"[red]hub refusals and errors by reason:[/] {hub.reasons}")
    out.print(f"CPU is in cores over each measured window. The {args.clients} client processes share this machine's "
              f"{os.cpu_count()} cores with the server under test and PostgreSQL: a server near 1.00 is CPU-bound in "
              "its Python process; clients near the cores left over mean the clients limit the figure; 'other' is "
              "the kernel and anything else running here (a busy 'other' disturbs the figures).")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--database", choices=["sqlite", "postgres"], default="sqlite")
    add("--mode", choices=["unary", "batch"], default="unary")
    add("--batch-size", type=int, default=100, help="items per ConvertBatch (--mode batch), at most 1000")
    add("--duration", type=float, default=20.0, help="seconds measured, for each row")
    add("--warmup", type=float, default=2.0, help="seconds of load before measuring starts")
    add("--concurrency", type=int, default=16, help="calls in flight, over all client processes")
    add("--clients", type=int, help="client processes (default: min(concurrency, 4))")
    add("--workers", type=int, default=1, help="hub processes (`pointsx serve --workers`, passed only when > 1)")
    add("--write-batch-max", type=int, help="the hub's [hub] write_batch_max (default: the hub's own)")
    add("--merchants", type=int, default=4)
    add("--members", type=int, help="people, each at every merchant (default: one per call in flight)")
    add("--src-points", type=int, default=10, help="points per conversion")
    add("--half-load", action=argparse.BooleanOptionalAction, default=True, help="also run at half the hub's calls/s")
    add("--echo", action=argparse.BooleanOptionalAction, default=True, help="run the echo baselines")
    add("--pgbench", default=shutil.which("pgbench") or "/usr/bin/pgbench", help="the pgbench binary")
    add("--no-pgbench", action="store_true", help="skip the pgbench baseline")
    add("--pgbench-scale", type=int, default=10, help="pgbench -i -s")
    add("--profile-hub", metavar="FILE", help="run the hub under cProfile (every thread), write the stats here")
    add("--json", action="store_true", help="print the figures as JSON instead of tables")
    args = parser.parse_args()
    args.clients = args.clients or min(args.concurrency, 4)
    args.members = args.members or args.concurrency
    if not (1 <= args.clients <= args.concurrency <= args.members) or not 1 <= args.batch_size <= 1000:
        parser.error("need 1 <= --clients <= --concurrency <= --members and 1 <= --batch-size <= 1000")
    shape = load.Shape(args.concurrency, args.clients, args.batch_size, args.src_points, args.warmup, args.duration,
                       batch_echo=args.mode == "batch")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_hub_") as tmp:
        rows, memory, network = run_hub(args, shape, Path(tmp))
        if args.echo:
            rows["echo"] = run_echo(network, shape, verify=False)
            rows["echo_auth"] = run_echo(network, shape, verify=True)
        if not args.no_pgbench:
            rows["pgbench"] = run_pgbench(args, Path(tmp))
    figures = report(args, rows, memory)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print_tables(args, rows, figures)
    return 1 if any(r and (r.errors or r.refused) for r in (rows["hub"], rows["hub_half_load"])) else 0


if __name__ == "__main__":
    raise SystemExit(main())
