"""Reliability run: the bank test's long form and retry storms, on SQLite and/or PostgreSQL, for minutes.

What it runs, per backend (the time split evenly between backends):

  bank    tests/faults/bank.py: `--clients` threads issue, redeem, convert and reverse at random through
          the SDK against a real `pointsx serve`, which is SIGKILLed about every `--kill-every-s`
          seconds it serves (now and then while starting, now and then for longer than the clients'
          retries last) and restarted on the same port and database; rounds of `--round-s` s, each
          followed by resolving the ambiguous requests, checking every acknowledged one is stored
          exactly once, the balances against the acknowledged operations, the auditor, a clearing
          cycle, and the hub's log (no traceback, no warning) — for about 80% of the backend's time;
  storms  tests/faults/storm_cases.py: every mutating request kind sent 1-5 times at once under one
          request_id, round after round against a fresh hub (on PostgreSQL half the rounds through
          `pointsx serve --workers 2`) — the rest of the time.

How to read it: "invariant violations" counts every problem any check found and must be 0 (the
details are printed under the table, and the exit status is 1). "kills survived" is how often the
hub was killed and came back to a state that passed every check; "back to serving" is from the
restart to the health check answering SERVING (p50 / max). "ambiguous" requests are those whose
client gave up while the hub was down; "held" says how many of them the hub had in fact applied or
refused before it died (the rest had left no trace, as they must).

    python scripts/reliability.py --minutes 3 --database both
    python scripts/reliability.py --minutes 30 --database postgres --kill-every-s 2 --clients 12 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS.parent))

from tests import harness  # noqa: E402
from tests.faults.bank import BankConfig, BankFigures, run_bank  # noqa: E402
from tests.faults.storm_cases import StormFigures, run_storms  # noqa: E402

BANK_SHARE = 0.8  # of each backend's time; storms get the rest
ROUND_OVERHEAD_S = 8.0  # set-up, resolution, checks and a cycle, per bank round


@dataclass
class BackendRun:
    """One backend's figures."""

    backend: str
    seconds: float = 0.0
    bank: BankFigures = field(default_factory=BankFigures)
    storms: list[StormFigures] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return self.bank.problems + [p for s in self.storms for p in s.problems]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="total run time (default 3)")
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--kill-every-s", type=float, default=1.0, help="mean time serving between kills (default 1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent bank clients (default 8)")
    parser.add_argument("--round-s", type=float, default=30.0, help="chaos per bank round before its checks")
    parser.add_argument("--persons", type=int, default=12, help="people at every merchant (default 12)")
    parser.add_argument(
        "--db-fault-rate",
        type=float,
        default=0.0,
        help="also fail this share of the bank hub's statements with transient conflicts (e.g. 0.02)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="figures as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.kill_every_s <= 0 or args.clients < 1 or args.round_s <= 0:
        parser.error("--minutes, --kill-every-s, --round-s must be positive and --clients at least 1")
    return args


def run_backend(backend: str, budget_s: float, args: argparse.Namespace, console: Console) -> BackendRun:
    run = BackendRun(backend)
    began = time.monotonic()
    cfg = BankConfig(
        duration_s=min(args.round_s, max(5.0, budget_s * BANK_SHARE - ROUND_OVERHEAD_S)),
        clients=args.clients,
        persons=args.persons,
        kill_every_s=args.kill_every_s,
        seed=args.seed,
        db_fault_rate=args.db_fault_rate,
    )
    with tempfile.TemporaryDirectory(prefix=f"pointsx-reliability-{backend}-") as tmp:
        root = Path(tmp)
        url, name = harness.fresh_postgres_database() if backend == "postgres" else (None, "")
        try:
            console.log(f"{backend}: bank rounds of {cfg.duration_s:.0f} s for about {budget_s * BANK_SHARE:.0f} s")
            run.bank = run_bank(root / "bank", url, cfg, backend=backend, budget_s=budget_s * BANK_SHARE)
            console.log(f"{backend}: {run.bank.kills} kills, {run.bank.acknowledged} acknowledged, "
                        f"{len(run.bank.problems)} problems")  # fmt: skip
        finally:
            if name:
                harness.drop_postgres_database(name)
        storm_s = max(1.0, budget_s - (time.monotonic() - began))
        plans = [(1, storm_s)] if backend == "sqlite" else [(1, storm_s / 2), (2, storm_s / 2)]
        for workers, seconds in plans:
            url, name = harness.fresh_postgres_database() if backend == "postgres" else (None, "")
            try:
                console.log(f"{backend}: retry storms for {seconds:.0f} s, {workers} hub process(es)")
                run.storms.append(run_storms(root / f"storms-{workers}", url, budget_s=seconds, workers=workers))
            finally:
                if name:
                    harness.drop_postgres_database(name)
    run.seconds = time.monotonic() - began
    return run


def table(runs: list[BackendRun]) -> Table:
    out = Table(title="pointsx reliability: bank test under SIGKILL, retry storms")
    out.add_column("figure")
    for run in runs:
        out.add_column(run.backend, justify="right")

    def row(label: str, *cells: str) -> None:
        out.add_row(label, *cells)

    b = [r.bank for r in runs]
    row("run time (s)", *(f"{r.seconds:.0f}" for r in runs))
    row("bank rounds / cycles closed", *(f"{x.rounds} / {x.cycles}" for x in b))
    row("operations acknowledged", *(f"{x.acknowledged:,}" for x in b))
    row("refusals (stored)", *(f"{x.refused:,}" for x in b))
    row("kills survived (while starting)", *(f"{x.kills} ({x.kills_while_starting})" for x in b))
    row("outages longer than the retries", *(str(x.outages) for x in b))
    row("back to serving p50 / max (s)", *(f"{x.serving_p50_s():.2f} / {x.serving_max_s():.2f}" for x in b))
    row("calls / retries sent", *(f"{x.calls:,} / {x.retries:,}" for x in b))
    row("ambiguous resolved (held)", *(f"{x.ambiguous} ({x.ambiguous_held})" for x in b))
    row("unexpected answers", *(str(x.unexpected) for x in b))
    row("storm rounds / kinds sent", *(f"{sum(s.rounds for s in r.storms)} / {sum(s.cases for s in r.storms)}"
                                       for r in runs))  # fmt: skip
    row("storm copies sent", *(f"{sum(s.copies for s in r.storms):,}" for r in runs))
    row("invariant violations", *(f"[bold {'red' if r.problems else 'green'}]{len(r.problems)}" for r in runs))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=args.json)
    backends = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    budget_s = args.minutes * 60 / len(backends)
    runs: list[BackendRun] = []
    try:
        for backend in backends:
            runs.append(run_backend(backend, budget_s, args, console))
    finally:
        harness.drop_template()
    if args.json:
        print(json.dumps([asdict(r) for r in runs], indent=2))
    else:
        console.print(table(runs))
    for run in runs:
        for problem in run.problems:
            console.print(Text.assemble((f"{run.backend}: ", "red"), problem))
    return 1 if any(r.problems for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
