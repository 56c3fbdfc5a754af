"""The one seam where SQLite and PostgreSQL differ: everything above the store asks here.

SQLite is one writer at a time (`BEGIN IMMEDIATE` takes the database's write lock), so what it
reads inside a write transaction is already exact and nothing needs a row lock; PostgreSQL runs
writers side by side under READ COMMITTED, so rows a decision rests on are locked (`FOR UPDATE`,
in a fixed order) and cross-process exclusion is an advisory lock. Code outside `exchange/store/`
never branches on the database: it calls these functions, which say what they guarantee.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, func, select, text

from exchange.store.engine import is_sqlite
from exchange.store.schema import operations

T = TypeVar("T")


def writers_serialised(conn: Connection) -> bool:
    """True when this write transaction is the only writer (SQLite): its reads need no row locks."""
    return is_sqlite(conn.engine)


def embedded(engine: Engine) -> bool:
    """The database is a file owned by this hub (SQLite): migrate on start, checkpoint its WAL."""
    return is_sqlite(engine)


_LAST_SEQ = select(func.coalesce(func.max(operations.c.operation_seq), 0))
_NEXT_SEQS = text("SELECT nextval(pg_get_serial_sequence('operations', 'operation_seq')) FROM generate_series(1, :n)")


def allocate_operation_seqs(conn: Connection, count: int) -> list[int]:
    """`count` fresh operation ids, ascending, for rows this transaction inserts itself."""
    if count <= 0:
        return []
    if writers_serialised(conn):  # one writer at a time: the next ids are ours
        last = int(conn.execute(_LAST_SEQ).scalar_one())
        return list(range(last + 1, last + 1 + count))
    return sorted(int(seq) for seq in conn.execute(_NEXT_SEQS, {"n": count}).scalars())


def advisory_lock(conn: Connection, key: str, *, shared: bool = False) -> None:
    """Hold a transaction-scoped lock named `key` until commit (SQLite: the write lock already is one)."""
    if writers_serialised(conn):
        return
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.execute(text(f"SELECT {function}(hashtext(:key))"), {"key": key})


def bytewise(conn: Connection, column: Any) -> Any:
    """`column` compared byte by byte (SQLite's default; PostgreSQL's "C" collation)."""
    return column if is_sqlite(conn.engine) else column.collate("C")


def set_aggregate_memory(conn: Connection, work_mem: str) -> None:
    """Let this transaction's big aggregates hash in memory (PostgreSQL's work_mem; SQLite has none)."""
    if not is_sqlite(conn.engine):
        conn.execute(text(f"SET LOCAL work_mem = '{work_mem}'"))


def commit_ahead(conn: Connection, work: Callable[[Connection], T]) -> T:
    """Run `work` so that, once this returns, every other writer is bound by it and `conn` reads it.

    Writers side by side (PostgreSQL): in a transaction of its own, committed on return, so other
    writers wait on it only for that instant, not for all of `conn`'s transaction (READ COMMITTED:
    `conn`'s later statements see it). One writer at a
    time (SQLite): inside `conn`'s transaction — no other writer can come in between.
    """
    if writers_serialised(conn):
        return work(conn)
    with conn.engine.connect() as ahead, ahead.begin():
        return work(ahead)


def sql_flavour(conn: Connection) -> str:
    """The SQL dialect's name ("sqlite", "postgresql"), for SQL builders that spell a construct per database."""
    return conn.engine.dialect.name
