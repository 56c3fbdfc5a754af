"""The one seam where SQLite and PostgreSQL differ: everything above the store asks here.

SQLite is one writer at a time (`BEGIN IMMEDIATE` takes the database's write lock), so what it
reads inside a write transaction is already exact and nothing needs a row lock; PostgreSQL runs
writers side by side under READ COMMITTED, so rows a decision rests on are locked (`FOR UPDATE`,
in a fixed order) and cross-process exclusion is an advisory lock. Code outside `exchange/store/`
never branches on the database: it calls these functions, which say what they guarantee.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from sqlalchemy import Connection, Engine, Executable, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler

from exchange.store import faults
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


def operation_seqs_query(conn: Connection, count: int) -> tuple[Executable, dict[str, Any]] | None:
    """A read that reserves `count` operation ids ahead (PostgreSQL's sequence; an id reserved and
    not used is a gap, as after any rollback), to send with others; None where ids are taken at
    write time (SQLite: `allocate_operation_seqs`)."""
    if writers_serialised(conn) or count <= 0:
        return None
    return _NEXT_SEQS, {"n": count}


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


# --- many reads in one round trip -------------------------------------------------------------

Query = tuple[Executable, Mapping[str, Any]]
_COMPILED: dict[int, tuple[Executable, SQLCompiler]] = {}  # by statement identity; the statement kept alive
_ROW_TYPES: dict[tuple[str, ...], Any] = {}


def _compiled(conn: Connection, statement: Executable) -> SQLCompiler:
    hit = _COMPILED.get(id(statement))
    if hit is None or hit[0] is not statement:
        compiled = statement.compile(dialect=conn.dialect)  # type: ignore[attr-defined]
        hit = _COMPILED[id(statement)] = (statement, compiled)
    return hit[1]


def _row_type(names: tuple[str, ...]) -> Any:
    row_type = _ROW_TYPES.get(names)
    if row_type is None:
        row_type = _ROW_TYPES[names] = collections.namedtuple("Row", names, rename=True)  # type: ignore[misc]
    return row_type


def read_all(conn: Connection, queries: Sequence[Query]) -> list[list[Any]]:
    """Each query's rows (attributes by column name), in order, on this transaction.

    The statements run one after another, each seeing what committed before it starts (READ
    COMMITTED), so a lock taken by one is held when the next reads. On PostgreSQL they travel in
    one round trip (psycopg's pipeline mode): a batch's snapshot costs one wait for the server
    instead of ten, and the writer thread gives up the GIL once instead of ten times. On SQLite —
    in-process, nothing to save — and under the reliability suite's fault injector, whose faults
    take the place of statements SQLAlchemy runs, each runs through SQLAlchemy as usual.
    """
    if is_sqlite(conn.engine) or faults.injector_of(conn.engine) is not None:
        return [list(conn.execute(statement, params)) for statement, params in queries]  # type: ignore[call-overload]
    states = [_compiled(conn, statement).construct_expanded_state(dict(params)) for statement, params in queries]
    raw: Any = conn.connection.dbapi_connection
    try:
        with raw.pipeline():
            cursors = []
            for state in states:
                cursor = raw.cursor()
                cursor.execute(state.statement, state.parameters)
                cursors.append(cursor)
            results: list[list[Any]] = []
            for cursor in cursors:  # every query is a SELECT; its columns are known once it is fetched
                rows = cursor.fetchall()
                row_type = _row_type(tuple(column.name for column in cursor.description or ()))
                results.append([row_type(*row) for row in rows])
                cursor.close()
    except psycopg.Error as exc:  # as SQLAlchemy would raise it: the hub classifies DBAPIError
        raise DBAPIError.instance(
            "; ".join(s.statement for s in states), None, exc, psycopg.Error, dialect=conn.dialect
        ) from exc
    return results
