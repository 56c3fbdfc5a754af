"""The clearing benchmark script runs end to end (its figures come from full runs, not from CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_clearing.py"


def test_bench_clearing_prints_its_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--database", "both", "--conversions", "2000", "--merchants", "20"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "│" in line and ("sqlite" in line or "postgres" in line)]
    assert len(rows) == 4, result.stdout  # 200 and 2,000 conversions on each database
    assert all(float(row.split("│")[4]) >= 0 and float(row.split("│")[5]) > 0 for row in rows)  # seconds, MB
