"""Fixtures: a real hub per test on SQLite and on PostgreSQL, with the auditor run afterwards.

PostgreSQL is required (CI must fail, not skip, without it). Set POINTSX_TEST_BACKENDS=sqlite to
run only the SQLite half on a machine without PostgreSQL, knowingly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import harness
from tests.auditor import check_invariants

BACKENDS = [b.strip() for b in os.environ.get("POINTSX_TEST_BACKENDS", "sqlite,postgres").split(",") if b.strip()]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_url(backend: str) -> Iterator[str | None]:
    if backend == "sqlite":
        yield None  # the data directory's SQLite file
        return
    url, name = harness.fresh_postgres_database()
    try:
        yield url
    finally:
        harness.drop_postgres_database(name)


@pytest.fixture
def hub(tmp_path: Path, database_url: str | None) -> Iterator[harness.RunningHub]:
    running = harness.RunningHub(tmp_path, database_url)
    try:
        yield running
        check_invariants(running.hub.engine)
        check_writer(running)
    finally:
        running.stop()


@pytest.fixture
def postgres_hub(tmp_path: Path) -> Iterator[harness.RunningHub]:
    url, name = harness.fresh_postgres_database()
    running = harness.RunningHub(tmp_path, url)
    try:
        yield running
        check_invariants(running.hub.engine)
        check_writer(running)
    finally:
        running.stop()
        harness.drop_postgres_database(name)


def check_writer(running: harness.RunningHub) -> None:
    """Every scenario also proves the set-based path sound: a bulk run that raised (other than a
    database conflict) fell back to the single path and hid a bug there."""
    stats = running.hub.writer.stats
    assert stats.bulk_bugs == 0, f"{stats.bulk_bugs} bulk runs of the ledger writer failed: see the log"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    harness.drop_template()
