"""Benchmark: the hub's throughput goals, each configuration of `bench_hub.py` run once, one table.

Runs `scripts/bench_hub.py --json` for every figure the goals name (on this machine, one after the
other, nothing else running) and prints each measured ratio beside its goal:

  unary Convert ÷ echo with the signature check, PostgreSQL and SQLite     ≥ 0.6
  Convert p99 at half of the measured maximum load (both databases)        ≤ 25 ms
  ConvertBatch ×100 and ×1,000 conv/s ÷ pgbench tpcb-like tps              ≥ 10
  all traffic on one pair of merchants ÷ traffic spread over 20            ≥ 0.8
  `serve --workers 2` ÷ one worker, unary and ×100 batches (PostgreSQL)    > 1
  hub peak RSS through every run                                          < 300 MB

Each configuration takes about `--duration` × 3-5 s. `--json FILE` also keeps every run's figures.

    python scripts/bench_goals.py --duration 15
    python scripts/bench_goals.py --only unary --database postgres
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
console = Console(stderr=True)

_HUB_ONLY = ["--no-echo", "--no-pgbench", "--no-half-load"]
# name -> bench_hub.py arguments (besides --json and --duration)
RUNS: dict[str, list[str]] = {
    "pg_unary": ["--database", "postgres"],
    "sqlite_unary": ["--database", "sqlite", "--no-pgbench"],
    "pg_batch100": ["--database", "postgres", "--mode", "batch", "--batch-size", "100", "--no-echo"],
    "pg_batch1000": ["--database", "postgres", "--mode", "batch", "--batch-size", "1000", "--no-echo"],
    "sqlite_batch100": ["--database", "sqlite", "--mode", "batch", "--batch-size", "100", "--no-echo"],
    "sqlite_batch1000": ["--database", "sqlite", "--mode", "batch", "--batch-size", "1000", "--no-echo"],
    "pg_unary_workers2": ["--database", "postgres", "--workers", "2", "--no-echo", "--no-pgbench"],
    "pg_batch100_workers2": ["--database", "postgres", "--mode", "batch", "--workers", "2", *_HUB_ONLY],
    "pg_one_pair": ["--database", "postgres", "--merchants", "2", *_HUB_ONLY],
    "pg_spread20": ["--database", "postgres", "--merchants", "20", *_HUB_ONLY],
}
GROUPS = {
    "unary": ["pg_unary", "sqlite_unary"],
    "batch": ["pg_batch100", "pg_batch1000", "sqlite_batch100", "sqlite_batch1000"],
    "workers": ["pg_unary", "pg_unary_workers2", "pg_batch100", "pg_batch100_workers2"],
    "spread": ["pg_one_pair", "pg_spread20"],
}


def run(name: str, duration: float) -> dict[str, Any] | None:
    console.print(f"[bold]{name}[/]: bench_hub.py {' '.join(RUNS[name])}")
    command = [sys.executable, str(HERE / "bench_hub.py"), "--json", "--duration", str(duration), *RUNS[name]]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1) or not done.stdout.strip():
        console.print(f"[red]{name} failed[/] (exit {done.returncode}): {done.stderr.strip()[-400:]}")
        return None
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def _rate(figures: dict[str, Any] | None, row: str = "hub") -> float | None:
    found = (figures or {}).get(row)
    return float(found["items_per_s"]) if found else None


def goals(results: dict[str, dict[str, Any] | None]) -> list[tuple[str, float | None, str, bool | None]]:
    """(figure, value, goal, met) for every goal the runs at hand can answer."""
    rows: list[tuple[str, float | None, str, bool | None]] = []

    def add(label: str, value: float | None, goal: str, ok: bool | None) -> None:
        rows.append((label, value, goal, None if value is None else ok))

    for db in ("pg", "sqlite"):
        figures = results.get(f"{db}_unary")
        if figures:
            ratio = figures["ratios"]["hub_calls_per_echo_auth_calls"]
            add(f"{db} unary Convert ÷ echo with signature check", ratio, "≥ 0.6", ratio is not None and ratio >= 0.6)
            half = figures.get("hub_half_load")
            p99 = float(half["p99_ms"]) if half else None
            add(f"{db} Convert p99 at half load, ms", p99, "≤ 25", p99 is not None and p99 <= 25)
    for name in ("pg_batch100", "pg_batch1000", "sqlite_batch100", "sqlite_batch1000"):
        figures = results.get(name)
        if figures:
            ratio = figures["ratios"]["hub_conversions_per_pgbench_tps"]
            add(f"{name} conv/s ÷ pgbench tps", ratio, "≥ 10", ratio is not None and ratio >= 10)
    one, spread = _rate(results.get("pg_one_pair")), _rate(results.get("pg_spread20"))
    if one and spread:
        add("one pair of merchants ÷ spread over 20 (pg unary)", one / spread, "≥ 0.8", one / spread >= 0.8)
    for single, double in (("pg_unary", "pg_unary_workers2"), ("pg_batch100", "pg_batch100_workers2")):
        a, b = _rate(results.get(single)), _rate(results.get(double))
        if a and b:
            add(f"{double} ÷ one worker", b / a, "> 1", b / a > 1)
    peaks = [float(f["hub_peak_rss_mb"]) for f in results.values() if f]
    if peaks:
        add("hub peak RSS over the runs, MB", max(peaks), "< 300", max(peaks) < 300)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds measured per row of each run")
    parser.add_argument("--only", choices=sorted(GROUPS), action="append", help="run only these groups")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures and the goals here")
    args = parser.parse_args()
    names = list(RUNS) if not args.only else list(dict.fromkeys(n for g in args.only for n in GROUPS[g]))
    results = {name: run(name, args.duration) for name in names}
    table = Table("figure", "value", "goal", "", title="pointsx throughput goals (scripts/bench_goals.py)")
    rows = goals(results)
    for label, value, goal, met in rows:
        shown = "—" if value is None else f"{value:,.2f}"
        table.add_row(label, shown, goal, "" if met is None else ("[green]met[/]" if met else "[red]missed[/]"))
    for name, figures in results.items():
        if figures:
            hub = figures["hub"]
            console.print(f"{name}: {hub['items_per_s']:,.0f} conv/s, p50 {hub['p50_ms']:.1f} ms, "
                          f"p99 {hub['p99_ms']:.1f} ms, peak RSS {figures['hub_peak_rss_mb']} MB")  # fmt: skip
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "goals": rows}, indent=2))
    return 0 if all(f is not None for f in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
