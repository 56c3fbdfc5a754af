"""Migration 0004 moves existing clearing data to windows, or refuses — on SQLite and PostgreSQL.

A database at revision 0003 is filled by hand with what the old closing wrote (operations carrying
their cycle_id, a per-pair breakdown table). Upgraded, its cycle has the window and id bounds its
operations give and the fence stands at its cutoff; downgraded, the breakdown comes back from the
signed statements. An operation whose recorded cycle is not the one its stamp falls in makes the
upgrade stop and name it, leaving the database at 0003.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import BigInteger, Boolean, Engine, Integer, LargeBinary, MetaData, create_engine, insert, select

from exchange.store import migrate
from tests import harness

CUTOFF = 1_700_000_100_000


@pytest.fixture
def old_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """The URL of a database at revision 0003."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        command.upgrade(migrate.alembic_config(url), "0003")
        yield url
        return
    name = f"pointsx_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(harness.PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = harness._url(name)
    try:
        command.upgrade(migrate.alembic_config(url), "0003")
        yield url
    finally:
        harness.drop_postgres_database(name)


def _filler(column: Any) -> object:
    if isinstance(column.type, Boolean):
        return False
    if isinstance(column.type, BigInteger | Integer):
        return 0
    if isinstance(column.type, LargeBinary):
        return b""
    return ""


def _rows(engine: Engine, table: str, rows: list[dict[str, object]]) -> None:
    """Insert with every NOT NULL column this test does not care about filled in."""
    meta = MetaData()
    meta.reflect(engine, only=[table])
    target = meta.tables[table]
    full = [
        {
            c.name: row.get(c.name, None if c.nullable else _filler(c))
            for c in target.columns
            if c.autoincrement is not True
        }
        | row
        for row in rows
    ]
    with engine.begin() as conn:
        conn.execute(insert(target), full)


def _old_clearing(engine: Engine, *, late_seq_cycle: str | None) -> None:
    """Two conversions cleared in cycle C1, one after the cutoff; the third's cycle_id as given."""
    _rows(engine, "merchants", [{"merchant_id": m, "currency": "CNY", "status": "active"} for m in ("a", "b")])
    stamps = {1: CUTOFF - 50, 2: CUTOFF - 10, 3: CUTOFF + 10}
    cycle_of = {1: "C1", 2: "C1", 3: late_seq_cycle}
    _rows(
        engine,
        "operations",
        [
            {"operation_seq": seq, "kind": "convert", "caller": "a", "request_id": str(uuid.UUID(int=seq)),
             "merchant_id": "a", "points": 100, "counterparty_merchant_id": "b", "created_at_ms": stamp,
             "cycle_id": cycle_of[seq], "currency": "CNY"}
            for seq, stamp in stamps.items()
        ],
    )  # fmt: skip
    _rows(
        engine,
        "conversions",
        [
            {"operation_seq": seq, "source_merchant_id": "a", "destination_merchant_id": "b", "currency": "CNY",
             "src_points": 100, "dst_points": 1, "src_value_micros": 10_000, "dst_value_micros": 990_000,
             "src_cash_micros": 1_000_000, "fee_micros": 10_000, "dst_cash_micros": 990_000, "residue_micros": 0,
             "status": "completed", "created_at_ms": stamp}
            for seq, stamp in stamps.items()
        ],
    )  # fmt: skip
    _rows(engine, "cycles", [{"cycle_id": "C1", "currency": "CNY", "period_start_ms": CUTOFF - 50,
                              "cutoff_ms": CUTOFF, "status": "closed", "operation_count": 2}])  # fmt: skip
    body = json.dumps({"counterparties": {"b": {"payable": "2000000", "receivable": "0"}}}).encode()
    _rows(engine, "statements", [{"cycle_id": "C1", "merchant_id": "a", "currency": "CNY", "cutoff_ms": CUTOFF,
                                  "statement_json": body, "signature": b"\0" * 64}])  # fmt: skip
    _rows(engine, "cycle_counterparties", [{"cycle_id": "C1", "merchant_id": "a", "counterparty_id": "b",
                                            "payable_micros": 2_000_000, "receivable_micros": 0}])  # fmt: skip


def test_existing_cycles_get_their_windows_and_the_fence(old_database: str) -> None:
    engine = create_engine(old_database)
    try:
        _old_clearing(engine, late_seq_cycle=None)
        migrate.upgrade(old_database)
        meta = MetaData()
        meta.reflect(engine)
        assert "cycle_counterparties" not in meta.tables and "cycle_id" not in meta.tables["operations"].c
        cycles, fences = meta.tables["cycles"], meta.tables["clearing_fences"]
        with engine.connect() as conn:
            window = conn.execute(
                select(cycles.c.window_start_ms, cycles.c.first_operation_seq, cycles.c.last_operation_seq)
            ).one()
            assert tuple(window) == (0, 1, 2)
            fenced = [tuple(r) for r in conn.execute(select(fences.c.currency, fences.c.fenced_before_ms))]
            assert fenced == [("CNY", CUTOFF)]

        command.downgrade(migrate.alembic_config(old_database), "0003")
        meta = MetaData()
        meta.reflect(engine)
        operations, breakdown = meta.tables["operations"], meta.tables["cycle_counterparties"]
        with engine.connect() as conn:
            assigned = {
                int(seq): cycle
                for seq, cycle in conn.execute(select(operations.c.operation_seq, operations.c.cycle_id))
            }
            assert assigned == {1: "C1", 2: "C1", 3: None}
            rows = conn.execute(
                select(breakdown.c.merchant_id, breakdown.c.counterparty_id, breakdown.c.payable_micros)
            ).all()
            assert [tuple(r) for r in rows] == [("a", "b", 2_000_000)]
    finally:
        engine.dispose()


def test_an_operation_cleared_outside_its_window_stops_the_upgrade(old_database: str) -> None:
    engine = create_engine(old_database)
    try:
        _old_clearing(engine, late_seq_cycle="C1")  # stamped after C1's cutoff, yet cleared in C1
        with pytest.raises(RuntimeError, match="op_0000000000000003"):
            migrate.upgrade(old_database)
        assert migrate.current_revision(engine) == "0003"
    finally:
        engine.dispose()
