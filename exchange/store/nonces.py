"""Seen nonces, in the database so a replay is caught by whichever hub process it reaches."""

from __future__ import annotations

from sqlalchemy import Engine, delete, insert
from sqlalchemy.exc import IntegrityError

from exchange.store.engine import write_transaction
from exchange.store.schema import nonces


def remember(engine: Engine, key_id: str, nonce: str, now_ms: int) -> bool:
    """True the first time (key_id, nonce) is seen; False for a replay."""
    try:
        with write_transaction(engine) as conn:
            conn.execute(insert(nonces).values(key_id=key_id, nonce=nonce, seen_at_ms=now_ms))
    except IntegrityError:
        return False
    return True


def prune(engine: Engine, older_than_ms: int) -> int:
    """Nonces older than the timestamp window can never be replayed: their timestamp is refused."""
    with write_transaction(engine) as conn:
        return int(conn.execute(delete(nonces).where(nonces.c.seen_at_ms < older_than_ms)).rowcount)
