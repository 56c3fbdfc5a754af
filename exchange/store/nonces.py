"""Seen nonces, in the database so a replay is caught by whichever hub process it reaches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy.exc import IntegrityError

from exchange.domain import errors
from exchange.store import bulk
from exchange.store.engine import write_transaction
from exchange.store.schema import nonces

_SEEN_MANY = select(nonces.c.key_id, nonces.c.nonce)


def remember(engine: Engine, key_id: str, nonce: str, now_ms: int) -> bool:
    """True the first time (key_id, nonce) is seen; False for a replay. In a transaction of its own."""
    try:
        with write_transaction(engine) as conn:
            conn.execute(insert(nonces).values(key_id=key_id, nonce=nonce, seen_at_ms=now_ms))
    except IntegrityError:
        return False
    return True


def remember_in(conn: Connection, key_id: str, nonce: str, now_ms: int) -> bool:
    """The same inside a transaction somebody else commits (the writer's batch).

    Already seen — committed, or earlier in this very batch — is a replay. A twin racing in another
    hub process makes the insert fail; the writer then runs this again alone, via `remember`.
    """
    return remember_many(conn, [(key_id, nonce, now_ms)])[0]


def replayed() -> errors.NonceReplayed:
    return errors.NonceReplayed("nonce already used: this request was replayed")


def remember_many(conn: Connection, seen: list[tuple[str, str, int]]) -> list[bool]:
    """`remember_in` for a batch's (key_id, nonce, now_ms) triples, in two statements."""
    statement, params = seen_query(conn, seen)
    return remember_found(conn, seen, conn.execute(statement, params).all())


def seen_query(conn: Connection, seen: list[tuple[str, str, int]]) -> tuple[Any, dict[str, Any]]:
    """The read of `remember_many`: which of these nonces are stored already."""
    keys = sorted({(key_id, nonce) for key_id, nonce, _at in seen})
    return bulk.by_keys(conn, _SEEN_MANY, nonces, ("key_id", "nonce"), keys)


def remember_found(conn: Connection, seen: list[tuple[str, str, int]], found: Iterable[Any]) -> list[bool]:
    """Store the nonces not `found`; for each triple, whether it is new.

    The first of a nonce repeated inside the batch is new (if not already stored), its repeats are
    replays. A twin stored concurrently by another hub process fails the insert; the writer then
    runs each nonce the single way.
    """
    stored = {(str(k), str(n)) for k, n in found}
    fresh: list[dict[str, object]] = []
    answers: list[bool] = []
    for key_id, nonce, at_ms in seen:
        new = (key_id, nonce) not in stored
        if new:
            stored.add((key_id, nonce))
            fresh.append({"key_id": key_id, "nonce": nonce, "seen_at_ms": at_ms})
        answers.append(new)
    bulk.insert_rows(conn, nonces, fresh)
    return answers


def prune(engine: Engine, older_than_ms: int) -> int:
    """Nonces older than the timestamp window can never be replayed: their timestamp is refused."""
    with write_transaction(engine) as conn:
        return int(conn.execute(delete(nonces).where(nonces.c.seen_at_ms < older_than_ms)).rowcount)
