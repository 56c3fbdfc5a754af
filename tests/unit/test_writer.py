"""The group-commit writer on a real SQLite database: batches, per-item outcomes, and what runs alone.

Items are held back behind a gate so several are queued when the writer takes its next batch;
what each item writes is read back afterwards, so "committed" means found in the database.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Connection, Engine, Integer, MetaData, String, Table, insert, select, text
from sqlalchemy.exc import OperationalError

from exchange.store.engine import make_engine, write_transaction
from exchange.store.writer import LedgerWriter

meta = MetaData()
notes = Table("notes", meta, Column("id", Integer, primary_key=True), Column("body", String(50), nullable=False))
owners = Table("owners", meta, Column("id", Integer, primary_key=True))  # the parent of claims (below)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    made = make_engine(f"sqlite:///{tmp_path / 'writer.db'}")
    meta.create_all(made)
    with write_transaction(made) as conn:  # a foreign key checked only at commit
        conn.exec_driver_sql(
            "CREATE TABLE claims (id INTEGER PRIMARY KEY, owner_id INTEGER "
            "REFERENCES owners(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    yield made
    made.dispose()


def note(body: str) -> Callable[[Connection], str]:
    def work(conn: Connection) -> str:
        conn.execute(insert(notes).values(body=body))
        return body

    return work


def bodies(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return sorted(conn.execute(select(notes.c.body)).scalars())


class Gate:
    """The first item waits here, so the rest queue up behind it and share the next batch."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def work(self, conn: Connection) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "gate"


def test_queued_writes_share_one_commit_and_keep_their_own_outcomes(engine: Engine) -> None:
    writer = LedgerWriter(engine, max_batch=64)
    gate = Gate()
    try:
        first = writer.submit(gate.work, lambda: "gate")
        assert gate.entered.wait(10)
        ok = [writer.submit(note(f"n{i}"), lambda: "alone") for i in range(20)]

        def broken(conn: Connection) -> str:
            conn.execute(insert(notes).values(body="half-done"))
            raise ValueError("a bug in this one item")

        bad = writer.submit(broken, lambda: "never")
        gate.release.set()
        assert first.result(10) == "gate"
        assert [f.result(10) for f in ok] == [f"n{i}" for i in range(20)]
        with pytest.raises(ValueError, match="a bug in this one item"):
            bad.result(10)
    finally:
        writer.close()
    assert bodies(engine) == sorted(f"n{i}" for i in range(20)), "the broken item's work rolled back alone"
    assert writer.stats.batches == 2 and writer.stats.largest_batch == 21 and writer.stats.alone == 0


def test_a_database_conflict_in_one_item_runs_that_item_alone(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    gate = Gate()
    alone_ran: list[str] = []

    def conflicted(conn: Connection) -> str:
        conn.execute(insert(notes).values(body="lost with its savepoint"))
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    def alone() -> str:
        with write_transaction(engine) as conn:
            conn.execute(insert(notes).values(body="alone"))
        alone_ran.append("alone")
        return "alone"

    try:
        writer.submit(gate.work, lambda: "gate")
        assert gate.entered.wait(10)
        before = writer.submit(note("before"), lambda: "x")
        middle = writer.submit(conflicted, alone)
        after = writer.submit(note("after"), lambda: "x")
        gate.release.set()
        assert (before.result(10), middle.result(10), after.result(10)) == ("before", "alone", "after")
    finally:
        writer.close()
    assert bodies(engine) == ["after", "alone", "before"] and alone_ran == ["alone"]
    assert writer.stats.alone == 1


def test_a_batch_that_cannot_commit_runs_every_item_alone_once(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    gate = Gate()

    def orphan_claim(conn: Connection) -> str:  # passes now, fails the commit (deferred foreign key)
        conn.execute(text("INSERT INTO claims (id, owner_id) VALUES (1, 999)"))
        return "orphan"

    def alone_note(body: str) -> Callable[[], str]:
        def run() -> str:
            with write_transaction(engine) as conn:
                conn.execute(insert(notes).values(body=f"{body} alone"))
            return f"{body} alone"

        return run

    try:
        writer.submit(gate.work, lambda: "gate")
        assert gate.entered.wait(10)
        one = writer.submit(note("one"), alone_note("one"))
        orphan = writer.submit(orphan_claim, lambda: "refused alone")
        two = writer.submit(note("two"), alone_note("two"))
        gate.release.set()
        assert (one.result(10), orphan.result(10), two.result(10)) == ("one alone", "refused alone", "two alone")
    finally:
        writer.close()
    assert bodies(engine) == ["one alone", "two alone"], "the failed batch left nothing; each ran once, alone"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM claims")).scalar_one() == 0
    assert writer.stats.alone == 3


def test_a_closed_writer_finishes_its_queue_and_refuses_more(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    queued = [writer.submit(note(f"q{i}"), lambda: "x") for i in range(5)]
    writer.close()
    assert [f.result(10) for f in queued] == [f"q{i}" for i in range(5)]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(note("late"), lambda: "x")
    assert bodies(engine) == [f"q{i}" for i in range(5)]


def test_batch_size_is_bounded(engine: Engine) -> None:
    with pytest.raises(ValueError):
        LedgerWriter(engine, max_batch=0)


def test_an_item_that_fails_inside_its_own_savepoint_leaves_the_writer_writing(engine: Engine) -> None:
    """Found by the retry storm: an item failing with its own savepoint still open (as a mutation's
    effect does) made rolling back the item's warn, and the warning, as an error, killed the writer."""
    writer = LedgerWriter(engine)

    def nested_then_conflict(conn: Connection) -> str:
        conn.begin_nested()  # left open, as a failing effect leaves it
        conn.execute(insert(notes).values(body="undone"))
        raise OperationalError("UPDATE", {}, Exception("database is locked"))

    try:
        failed = writer.submit(nested_then_conflict, lambda: "alone")
        assert failed.result(10) == "alone"
        assert writer.submit(note("after"), lambda: "x").result(10) == "after"
    finally:
        writer.close()
    assert bodies(engine) == ["after"]


def test_a_write_cancelled_while_queued_is_dropped_unrun_and_the_writer_goes_on(engine: Engine) -> None:
    """Found by the retry storm: answering a future the caller had cancelled killed the writer."""
    writer = LedgerWriter(engine)
    gate = Gate()
    try:
        writer.submit(gate.work, lambda: "gate")
        assert gate.entered.wait(10)
        abandoned = writer.submit(note("abandoned"), lambda: "alone")
        assert abandoned.cancel(), "still queued: its caller may give up on it"
        kept = writer.submit(note("kept"), lambda: "alone")
        gate.release.set()
        assert kept.result(10) == "kept"
        assert writer.submit(note("later"), lambda: "x").result(10) == "later"
    finally:
        writer.close()
    assert bodies(engine) == ["kept", "later"]
