"""Engines for SQLite (embedded default) and PostgreSQL (production), set up as DESIGN §8 says.

SQLite: WAL, synchronous=FULL (an acknowledged write survives a power cut), foreign keys, a busy
timeout, and `BEGIN IMMEDIATE` for writes so two writers never deadlock on a lock upgrade.
pysqlite's own transaction handling is switched off (the two event hooks SQLAlchemy documents)
so SQLAlchemy's BEGIN is the one that runs. PostgreSQL: psycopg 3 at READ COMMITTED with guarded
updates — not SERIALIZABLE, which would turn hot merchant rows into retry storms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from exchange.store import checkpoints, faults

BUSY_TIMEOUT_MS = 30_000


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


@faults.installed_from_env  # POINTSX_FAULT_DB_RATE: the reliability suite's injected conflicts
def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        _install_sqlite_hooks(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed, isolation_level="READ COMMITTED", pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
    raise ValueError(f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}: sqlite or postgresql")


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # The hub checkpoints on a thread of its own (exchange/store/checkpoints.py); the automatic
        # one, run inside whichever commit passes the threshold, is only the backstop.
        cursor.execute(f"PRAGMA wal_autocheckpoint={checkpoints.AUTOCHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "BEGIN IMMEDIATE" if conn.get_execution_options().get("pointsx_write") else "BEGIN"
        conn.exec_driver_sql(mode)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that will write: BEGIN IMMEDIATE on SQLite, plain BEGIN on PostgreSQL."""
    with engine.connect() as conn:
        conn = conn.execution_options(pointsx_write=True)
        with conn.begin():
            yield conn


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn
