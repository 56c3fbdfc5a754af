"""The bank test (after Jepsen's): concurrent clients move points while the hub is SIGKILLed.

Six clients, each with its own SDK clients and a bounded retry budget, issue, redeem, convert
and (as the operator) reverse at random through a real `pointsx serve`, which is killed with SIGKILL
at random moments — now and then while it is still starting, now and then for longer than the
clients' retries last — and started again on the same port and database, at least 10 times per
backend. Afterwards (tests/faults/bank_check.py):

- every acknowledged request is stored exactly once under its (caller, request_id), with the very
  response the client got, and every refusal as that refusal with no operation;
- every ambiguous request (in flight when the hub died, retries spent) is held completely or not
  at all, and sent again with its request_id answers as stored (or runs now, if it was not held);
- no operation exists that no client was told of;
- each account holds what the acknowledged operations give it, in the database and over the wire,
  and a conversion is reversed exactly when its reversal was acknowledged;
- the auditor passes (per-asset sums zero, no negative balance, …), and a clearing cycle closed
  over the result holds exactly the acknowledged conversions and reversals and sums to zero.

The long form is `python scripts/reliability.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.bank import BankConfig, run_bank

CI = BankConfig(duration_s=10.0, clients=6, persons=10, kill_every_s=0.6, min_kills=10, seed=7)


@pytest.mark.timeout(180)
def test_bank_survives_kills_with_every_acknowledged_operation_once(
    tmp_path: Path, database_url: str | None, backend: str
) -> None:
    figures = run_bank(tmp_path, database_url, CI, backend=backend)
    assert not figures.problems, "\n".join(figures.problems)
    assert figures.kills >= CI.min_kills
    assert figures.acknowledged > 100, f"too little got through to prove anything: {figures}"
    assert figures.retries > 0, "no request was retried: the kills missed the traffic"
    assert figures.cycles == 1
