"""`dialect.read_all`: many reads in one round trip on PostgreSQL, each seeing what committed before it.

The conversion engine's snapshot rests on three properties of it: rows come back by column name
as SQLAlchemy's do; a later statement sees a lock taken, and a commit made, before it started (the
clearing fence depends on that); and a database error surfaces as SQLAlchemy's `DBAPIError` with
its SQLSTATE, so the writer classifies a deadlock as it classifies any other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, bindparam, create_engine, insert, select, text, tuple_
from sqlalchemy.exc import DBAPIError

from exchange.store import dialect, faults, migrate
from exchange.store.schema import clearing_fences, merchants
from tests import harness

_MERCHANTS = select(merchants.c.merchant_id, merchants.c.currency).where(
    merchants.c.merchant_id.in_(bindparam("ids", expanding=True))
)
_PAIRS = select(merchants.c.merchant_id).where(
    tuple_(merchants.c.merchant_id, merchants.c.currency).in_(bindparam("pairs", expanding=True))
)
_FENCE = select(clearing_fences.c.fenced_before_ms).where(clearing_fences.c.currency == bindparam("currency"))
_BOOM = text("SELECT * FROM no_such_table")


@pytest.fixture
def engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(backend, tmp_path)


@pytest.fixture
def postgres_engine(tmp_path: Path) -> Iterator[Engine]:
    yield from _engine("postgres", tmp_path)


def _engine(backend: str, tmp_path: Path) -> Iterator[Engine]:
    name = ""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/dialect.db"
    else:
        url, name = harness.fresh_postgres_database()
    migrate.upgrade(url)
    made = create_engine(url)
    with made.begin() as conn:
        conn.execute(insert(merchants), [_merchant("alpha", "CNY"), _merchant("beta", "USD")])
    try:
        yield made
    finally:
        made.dispose()
        if backend != "sqlite":
            harness.drop_postgres_database(name)


def _merchant(merchant_id: str, currency: str) -> dict[str, object]:
    return {
        "merchant_id": merchant_id, "name": merchant_id, "currency": currency, "status": "active",
        "net_debit_cap_micros": 0, "bank_json": "{}", "issuance_account_id": 1, "clearing_account_id": 2,
        "created_at_ms": 0,
    }  # fmt: skip


def test_rows_come_back_in_order_by_column_name(engine: Engine) -> None:
    with engine.begin() as conn:
        found = dialect.read_all(
            conn,
            [
                (_MERCHANTS, {"ids": ["alpha", "beta", "nobody"]}),
                (_PAIRS, {"pairs": [("beta", "USD"), ("alpha", "USD")]}),
                (_MERCHANTS, {"ids": ["alpha"]}),
            ],
        )
    assert sorted((r.merchant_id, r.currency) for r in found[0]) == [("alpha", "CNY"), ("beta", "USD")]
    assert [r.merchant_id for r in found[1]] == ["beta"]
    assert [(r.merchant_id, r.currency) for r in found[2]] == [("alpha", "CNY")]


def test_a_later_read_sees_what_committed_before_it_started(postgres_engine: Engine) -> None:
    """The fence protocol: a writer's shared lock waits for a close; its fence read then sees it.
    (PostgreSQL only: on SQLite one writer at a time means there is nothing to wait for.)"""
    engine = postgres_engine
    with engine.connect() as closer:
        close = closer.begin()
        closer.execute(text("SELECT pg_advisory_xact_lock(hashtext('pointsx-test'))"))
        closer.execute(insert(clearing_fences).values(currency="CNY", fenced_before_ms=42))
        with engine.begin() as writer:
            writer.execute(text("SET LOCAL lock_timeout = '5s'"))
            # The close commits while the writer's lock waits; the read after the lock sees its fence.
            timer = threading.Timer(0.3, close.commit)
            timer.start()
            _lock, fence = dialect.read_all(
                writer,
                [
                    (select(text("pg_advisory_xact_lock_shared(hashtext('pointsx-test'))")), {}),
                    (_FENCE, {"currency": "CNY"}),
                ],
            )
            timer.join()
    assert [r.fenced_before_ms for r in fence] == [42]


def test_a_database_error_is_sqlalchemys_with_its_sqlstate(engine: Engine, backend: str) -> None:
    with engine.connect() as conn, pytest.raises(DBAPIError) as raised:
        dialect.read_all(conn, [(_MERCHANTS, {"ids": ["alpha"]}), (_BOOM, {})])
    if backend != "sqlite":
        assert getattr(raised.value.orig, "sqlstate", None) == "42P01"  # undefined_table


def test_under_the_fault_injector_every_read_can_fail_as_injected(engine: Engine) -> None:
    """The reliability suite's faults take the place of statements SQLAlchemy runs: with an
    injector on the engine, the reads go through SQLAlchemy one by one, so they can be failed too."""
    injector = faults.install(engine, 1.0, seed=7)
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError):
            dialect.read_all(conn, [(_MERCHANTS, {"ids": ["alpha"]})])
        assert injector.stats.injected >= 1
    finally:
        faults.uninstall(engine)
