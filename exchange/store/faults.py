"""Injected database faults for the reliability suite: transient conflicts at a chosen rate.

With `POINTSX_FAULT_DB_RATE` set (a fraction, e.g. `0.2`) every engine `make_engine` builds gets
hooks that fail that share of its statements with an error the hub treats as transient
(`exchange.store.mutation.is_retryable`):

- PostgreSQL: the server itself raises SQLSTATE 40001 (serialization failure) or 40P01 (deadlock)
  in place of the statement, so psycopg raises `SerializationFailure` / `DeadlockDetected` and the
  transaction is aborted exactly as after a real conflict (only a rollback, or a rollback to a
  savepoint, goes on from there);
- SQLite: `sqlite3.OperationalError("database is locked")`, as SQLITE_BUSY surfaces.

The statement never runs: the fault takes its place. It is raised from the dialect's `do_execute`
events, which SQLAlchemy runs inside its DBAPI error handling — so the hub gets what a driver
error gives it (`sqlalchemy.exc.OperationalError` wrapping the DBAPI error, the cursor closed). A
`before_cursor_execute` hook would not do: SQLAlchemy calls it outside that handling, and what it
raises reaches the hub raw, as no real conflict ever does. Savepoint, commit and rollback
statements are never failed (no database fails those with a lock conflict).

`POINTSX_FAULT_DB_SEED` seeds the choice (reproducible given the same statement order);
`POINTSX_FAULT_DB_THREADS` (comma-separated thread-name prefixes, e.g. `ledger-writer`) limits the
faults to statements run on those threads; `POINTSX_FAULT_DB_LIMIT` stops after that many faults.
Alembic's engine (migrations) is never hooked. Nothing here runs unless the variable is set; tests
may also `install` an injector by hand, and pause it while they set a scene up or audit it.
"""

from __future__ import annotations

import functools
import os
import random
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec

from sqlalchemy import Engine, event

ENV_RATE = "POINTSX_FAULT_DB_RATE"
ENV_SEED = "POINTSX_FAULT_DB_SEED"
ENV_THREADS = "POINTSX_FAULT_DB_THREADS"
ENV_LIMIT = "POINTSX_FAULT_DB_LIMIT"

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
SQLITE_BUSY_MESSAGE = "database is locked"
# Statements no database refuses with a lock conflict: failing them would test fiction.
_NEVER_FAILED = ("SAVEPOINT", "RELEASE", "ROLLBACK", "COMMIT", "PRAGMA")
_PG_MESSAGES = {
    SERIALIZATION_FAILURE: "could not serialize access due to concurrent update",
    DEADLOCK_DETECTED: "deadlock detected",
}

P = ParamSpec("P")


@dataclass
class FaultStats:
    """What an injector has seen: statements it could have failed, and how many it did."""

    eligible: int = 0
    injected: int = 0


class FaultInjector:
    """Fails a seeded random share of an engine's statements; `active` switches it on and off.

    `threads` limits it to threads whose names start so; `match` to statements containing that
    text; `limit` to that many faults in all — so a test can fail exactly one chosen statement.
    """

    def __init__(
        self,
        dialect: str,
        rate: float,
        *,
        seed: int | None = None,
        threads: tuple[str, ...] = (),
        match: str | None = None,
        limit: int | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{ENV_RATE} must be a fraction between 0 and 1, got {rate}")
        self.dialect = dialect
        self.rate = rate
        self.threads = threads
        self.match = match
        self.limit = limit
        self.active = True
        self.stats = FaultStats()
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No faults inside the block (setting a scene up, auditing it afterwards)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def _draw(self, statement: str) -> str | None:
        """The SQLSTATE (or SQLite message) to fail this statement with, or None to let it run."""
        if not self.active or statement.lstrip().upper().startswith(_NEVER_FAILED):
            return None
        if self.threads and not threading.current_thread().name.startswith(self.threads):
            return None
        if self.match is not None and self.match not in statement:
            return None
        with self._lock:
            self.stats.eligible += 1
            if self._random.random() >= self.rate or (self.limit is not None and self.stats.injected >= self.limit):
                return None
            self.stats.injected += 1
            if self.dialect == "sqlite":
                return SQLITE_BUSY_MESSAGE
            return self._random.choice((SERIALIZATION_FAILURE, DEADLOCK_DETECTED))

    def do_execute(self, cursor: Any, statement: str, _parameters: Any, _context: Any) -> None:
        """Dialect event (`do_execute`, `do_executemany`): raise in place of the statement, or let it run."""
        self.do_execute_no_params(cursor, statement, _context)

    def do_execute_no_params(self, cursor: Any, statement: str, _context: Any) -> None:
        fault = self._draw(statement)
        if fault is None:
            return  # SQLAlchemy runs the statement itself
        if self.dialect == "sqlite":
            raise sqlite3.OperationalError(fault)
        _raise_on_server(cursor, fault)


def _raise_on_server(cursor: Any, sqlstate: str) -> None:
    """PostgreSQL raises the conflict itself: the transaction is aborted as by a real one."""
    message = f"{_PG_MESSAGES[sqlstate]} (injected by {ENV_RATE})"
    cursor.execute(f"DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', MESSAGE = '{message}'; END $$")
    raise AssertionError("the injected PostgreSQL fault did not raise")  # pragma: no cover


_installed: weakref.WeakKeyDictionary[Engine, FaultInjector] = weakref.WeakKeyDictionary()


def install(
    engine: Engine,
    rate: float,
    *,
    seed: int | None = None,
    threads: tuple[str, ...] = (),
    match: str | None = None,
    limit: int | None = None,
) -> FaultInjector:
    """Hook an injector onto `engine`: one per engine, so installing again replaces the first."""
    uninstall(engine)
    injector = FaultInjector(engine.dialect.name, rate, seed=seed, threads=threads, match=match, limit=limit)
    event.listen(engine, "do_execute", injector.do_execute)
    event.listen(engine, "do_executemany", injector.do_execute)
    event.listen(engine, "do_execute_no_params", injector.do_execute_no_params)
    _installed[engine] = injector
    return injector


def uninstall(engine: Engine) -> None:
    """Take the engine's injector off again (if it has one)."""
    injector = _installed.pop(engine, None)
    if injector is not None:
        event.remove(engine, "do_execute", injector.do_execute)
        event.remove(engine, "do_executemany", injector.do_execute)
        event.remove(engine, "do_execute_no_params", injector.do_execute_no_params)


def injector_of(engine: Engine) -> FaultInjector | None:
    return _installed.get(engine)


def _in_alembic_environment() -> bool:
    """True while an Alembic env.py runs (migrations): their engine stays fault-free."""
    from alembic import context

    return getattr(context, "_proxy", None) is not None


def install_from_env(engine: Engine) -> FaultInjector | None:
    """The injector `POINTSX_FAULT_DB_*` asks for, installed on `engine`; None when unset."""
    text = os.environ.get(ENV_RATE, "").strip()
    if not text or _in_alembic_environment():
        return None
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(f"{ENV_RATE} must be a fraction between 0 and 1, got {text!r}") from None
    seed_text = os.environ.get(ENV_SEED, "").strip()
    limit_text = os.environ.get(ENV_LIMIT, "").strip()
    threads = tuple(t.strip() for t in os.environ.get(ENV_THREADS, "").split(",") if t.strip())
    return install(
        engine,
        rate,
        seed=int(seed_text) if seed_text else None,
        threads=threads,
        limit=int(limit_text) if limit_text else None,
    )


def installed_from_env(make: Callable[P, Engine]) -> Callable[P, Engine]:
    """Decorates an engine factory: each engine it makes gets `install_from_env`."""

    @functools.wraps(make)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Engine:
        engine = make(*args, **kwargs)
        install_from_env(engine)
        return engine

    return wrapper
