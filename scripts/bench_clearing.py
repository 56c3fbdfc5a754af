"""Benchmark: close one clearing cycle of many conversions among many merchants.

Builds the cycle's raw material straight into a fresh database (merchants, positions, conversion
operations and records — the ledger's postings are not read by clearing, so they are not made),
then closes the cycle in a separate, fresh process and prints its wall time and peak memory. The
same close over a tenth of the conversions shows whether memory grows with their number.

    python scripts/bench_clearing.py --database sqlite --conversions 1000000 --merchants 1000
    python scripts/bench_clearing.py --database postgres
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import insert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clearing.close import Signing, close_cycle  # noqa: E402
from exchange.domain.conversion import convert_amounts  # noqa: E402
from exchange.store import audit, migrate, outbox  # noqa: E402
from exchange.store.engine import make_engine, write_transaction  # noqa: E402
from exchange.store.schema import conversions, merchant_positions, merchants, operations  # noqa: E402
from merchant_sdk.signing import key_id_of, public_key_bytes  # noqa: E402

console = Console(stderr=True)
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
CHUNK = 20_000
CURRENCY = "CNY"


def _merchant_rows(count: int) -> tuple[list[dict[str, object]], list[int]]:
    values = [random.choice((1_000, 2_000, 5_000, 10_000, 30_000, 50_000)) for _ in range(count)]
    rows = [
        {
            "merchant_id": f"m{i:05d}",
            "name": f"Merchant {i}",
            "currency": CURRENCY,
            "status": "active",
            "net_debit_cap_micros": 10**15,
            "bank_json": "{}",
            "issuance_account_id": 2 * i + 1,
            "clearing_account_id": 2 * i + 2,
            "created_at_ms": 0,
        }
        for i in range(count)
    ]
    return rows, values


def _conversion_rows(
    start: int, count: int, merchant_count: int, values: list[int], now_ms: int, seq_span: int
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """One conversion a millisecond, the last a second before now: stamps rise with ids, as live."""
    ops, convs = [], []
    for seq in range(start, start + count):
        s, d = random.sample(range(merchant_count), 2)
        amounts = convert_amounts(random.randint(100, 50_000), values[s], values[d], 100)
        ops.append(
            {
                "operation_seq": seq, "kind": "convert", "caller": f"m{s:05d}", "request_id": str(uuid.UUID(int=seq)),
                "merchant_id": f"m{s:05d}", "member_ref": f"member{seq % 5000}", "points": amounts.src_points,
                "counterparty_merchant_id": f"m{d:05d}", "memo": "", "created_at_ms": now_ms - 1_000 - seq_span + seq,
                "currency": CURRENCY,
            }
        )  # fmt: skip
        convs.append(
            {
                "operation_seq": seq, "source_merchant_id": f"m{s:05d}", "destination_merchant_id": f"m{d:05d}",
                "src_member_ref": f"member{seq % 5000}", "dst_member_ref": f"member{seq % 5000}",
                "currency": CURRENCY, "src_points": amounts.src_points, "dst_points": amounts.dst_points,
                "src_value_micros": values[s], "dst_value_micros": values[d], "fee_bps": 100,
                "src_cash_micros": amounts.src_cash, "fee_micros": amounts.fee, "dst_cash_micros": amounts.dst_cash,
                "residue_micros": amounts.residue, "quote_id": None, "status": "completed",
                "reversal_operation_seq": None, "created_at_ms": now_ms - 1_000 - seq_span + seq,
            }
        )  # fmt: skip
    return ops, convs


def _copy(url: str, table: str, rows: list[dict[str, object]]) -> None:
    """PostgreSQL COPY: the fast way to load benchmark data (not how the hub writes)."""
    import psycopg

    columns = list(rows[0])
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join("\\N" if row[c] is None else str(row[c]) for c in columns) + "\n")
    with (
        psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn,
        conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        copy.write(buffer.getvalue())


def build(url: str, conversion_count: int, merchant_count: int) -> None:
    random.seed(7)
    migrate.upgrade(url)
    engine = make_engine(url)
    merchant_rows, values = _merchant_rows(merchant_count)
    with write_transaction(engine) as conn:
        conn.execute(insert(merchants), merchant_rows)
        conn.execute(
            insert(merchant_positions), [{"merchant_id": r["merchant_id"], "open_net_micros": 0} for r in merchant_rows]
        )
    now_ms = int(time.time() * 1000)
    postgres = url.startswith("postgresql")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"writing {conversion_count:,} conversions", total=conversion_count)
        for start in range(1, conversion_count + 1, CHUNK):
            count = min(CHUNK, conversion_count + 1 - start)
            ops, convs = _conversion_rows(start, count, merchant_count, values, now_ms, conversion_count)
            if postgres:
                _copy(url, "operations", ops)
                _copy(url, "conversions", convs)
            else:
                with write_transaction(engine) as conn:
                    conn.execute(insert(operations), ops)
                    conn.execute(insert(conversions), convs)
            progress.advance(task, count)
    if postgres:
        with engine.begin() as conn:  # committed: an ANALYZE rolled back leaves the planner without statistics
            conn.exec_driver_sql("ANALYZE")
            conn.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('operations', 'operation_seq'), "
                "(SELECT max(operation_seq) FROM operations))"
            )
    engine.dispose()


def close_only(url: str) -> None:
    """Run in a fresh process: its peak RSS is the close's own."""
    engine = make_engine(url)
    key = Ed25519PrivateKey.generate()
    signing = Signing("bench", key, key_id_of(public_key_bytes(key.public_key())))
    baseline = _rss_mb("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    with write_transaction(engine) as conn:
        now = int(time.time() * 1000)
        outbox.begin(conn)  # as inside the hub's mutation runner: statements are announced too
        cycle_id = close_cycle(conn, currency=CURRENCY, cutoff_ms=now, now_ms=now, signing=signing)
        entry = audit.AuditEntry(now, "bench", signing.hub_key_id, "", "close", str(uuid.uuid4()), "", "")
        outbox.flush(conn, audit.append(conn, entry), now)
    elapsed = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    print(json.dumps({"cycle_id": cycle_id, "seconds": elapsed, "baseline_mb": baseline, "peak_mb": peak}))


def _rss_mb(field: str) -> float:
    """Resident memory from /proc (VmHWM: the peak since the last reset), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0): the peak measured is the close's own."""
    Path("/proc/self/clear_refs").write_text("5")


def _fresh_postgres() -> tuple[str, str]:
    import psycopg

    name = f"pointsx_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name


def _drop_postgres(name: str) -> None:
    import psycopg

    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(database: str, conversion_count: int, merchant_count: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        name = ""
        if database == "postgres":
            url, name = _fresh_postgres()
        else:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        try:
            started = time.perf_counter()
            build(url, conversion_count, merchant_count)
            built = time.perf_counter() - started
            out = subprocess.run(
                [sys.executable, __file__, "--close-only", url], capture_output=True, text=True, check=True
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["build_seconds"] = built
            return result  # type: ignore[no-any-return]
        finally:
            if name:
                _drop_postgres(name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--conversions", type=int, default=1_000_000)
    parser.add_argument("--merchants", type=int, default=1_000)
    parser.add_argument("--close-only", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.close_only:
        close_only(args.close_only)
        return 0
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    table = Table("database", "conversions", "merchants", "close (s)", "peak RSS (MB)", "RSS before (MB)",
                  "build (s)", title="closing one clearing cycle")  # fmt: skip
    for database in databases:
        for count in (args.conversions // 10, args.conversions):
            console.print(f"{database}: {count:,} conversions among {args.merchants:,} merchants ...")
            r = measure(database, count, args.merchants)
            table.add_row(database, f"{count:,}", f"{args.merchants:,}", f"{r['seconds']:.1f}", f"{r['peak_mb']:.0f}",
                          f"{r['baseline_mb']:.0f}", f"{r['build_seconds']:.0f}")  # fmt: skip
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
