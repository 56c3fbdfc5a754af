"""The hub benchmark script runs end to end and reports every figure (its speed is judged from full runs, not CI).

Both runs start together (they only have to work, not to be fast), so the module takes one run's time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_hub.py"
ROWS = ("hub", "hub_half_load", "echo", "echo_auth", "pgbench")
RUNS = {
    "sqlite-batch": ["--database", "sqlite", "--mode", "batch", "--batch-size", "10"],
    "postgres-unary": ["--database", "postgres", "--mode", "unary"],
}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, subprocess.Popen[str]]]:
    common = ["--duration", "2", "--warmup", "0.5", "--concurrency", "4", "--pgbench-scale", "1", "--json"]
    started = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPT), *args, *common],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        for name, args in RUNS.items()
    }
    try:
        yield started
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


@pytest.mark.parametrize("name", list(RUNS))
def test_bench_hub_prints_its_figures(runs: dict[str, subprocess.Popen[str]], name: str) -> None:
    stdout, stderr = runs[name].communicate(timeout=150)
    assert runs[name].returncode == 0, stderr[-4000:]
    figures = json.loads(stdout)

    assert figures["config"]["database"] == RUNS[name][1] and figures["config"]["concurrency"] == 4
    for row_name in ROWS:
        row = figures[row_name]
        assert row["calls"] > 0 and row["calls_per_s"] > 0, (row_name, row)
        assert 0 < row["p50_ms"] <= row["p99_ms"], (row_name, row)
        assert row["errors"] == 0 and row["refused"] == 0, (row_name, row)
        assert row["cpu_cores"]["server"] > 0, (row_name, row)
    hub = figures["hub"]
    assert hub["items"] == hub["calls"] * (10 if "batch" in name else 1) and hub["items_per_s"] > 0
    assert hub["cpu_cores"]["clients"] > 0
    assert all(value > 0 for value in figures["ratios"].values()), figures["ratios"]
    # a Python process with grpc and SQLAlchemy loaded, at least; PSS counts no more than RSS
    assert figures["hub_peak_rss_mb"] > 20 and 0 < figures["hub_peak_pss_mb"] <= figures["hub_peak_rss_mb"]
