"""`pointsx demo` runs the network end to end and checks itself; here we check what it tells."""

from __future__ import annotations

import subprocess
import sys


def test_demo_tells_the_whole_story() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exchange.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "INSUFFICIENT_POINTS" in out and "ROUTE_CLOSED" in out
    # 500 brew points at 0.01 CNY, 100 bps fee, into skyway miles at 0.05 CNY: 99 miles, 0.05 CNY fee.
    assert "brew -> skyway" in out and "500 -> 99" in out
    # The smallest brew amount that yields 1000 pageturn points (0.002 CNY each) is 203 points.
    assert "needs at least 203 brew points" in out and "203 -> 1004" in out
    # The cleared totals: brew is owed 9.45 CNY, skyway owes 11.70, pageturn is owed 2.00 (0.008 carried),
    # the platform's 0.242 of fees settles as 0.25 with the -0.008 carry that balances pageturn's.
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 6}
    assert "945" in lines["brew"] and "-1170" in lines["skyway"] and "200" in lines["pageturn"]
    assert "25" in lines["platform"] and "-8000" in lines["platform"]
    assert "nets and settlements sum to exactly zero" in out and out.count("— acknowledged") == 3
    assert "hash chain intact" in out and "demo complete" in out
