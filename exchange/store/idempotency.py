"""Idempotency records: (caller, request_id) -> request hash and the outcome, stored for good.

The record is written in the same transaction as the effect (STYLE habit 5): a commit holds both
or neither, so a retry either finds the outcome or finds nothing and runs again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from exchange.store import bulk
from exchange.store.schema import idempotency


@dataclass(frozen=True)
class StoredOutcome:
    method: str
    request_sha256: str
    outcome: str
    response: bytes | None  # the reply's bytes, for records stored before `result` existed
    result: bytes | None  # the domain result, canonical (exchange/domain/outcomes.py)
    error_category: str | None
    error_reason: str | None
    error_message: str | None
    error_metadata: str | None


# Built once: on the hot path, building and cache-keying a statement per call costs more than running it.
_KEY = (idempotency.c.caller == bindparam("caller")) & (idempotency.c.request_id == bindparam("request_id"))
_LOOKUP = select(
    idempotency.c.method,
    idempotency.c.request_sha256,
    idempotency.c.outcome,
    idempotency.c.response,
    idempotency.c.result,
    idempotency.c.error_category,
    idempotency.c.error_reason,
    idempotency.c.error_message,
    idempotency.c.error_metadata,
).where(_KEY)
_CLAIM = insert(idempotency).values(outcome="pending")
# An UPDATE's bind names may not be its column names: b_ for the key, the SET values by column.
_SETTLE_OK = (
    update(idempotency)
    .where(idempotency.c.caller == bindparam("b_caller"), idempotency.c.request_id == bindparam("b_request_id"))
    .values(outcome="ok")
)


_LOOKUP_MANY = select(idempotency.c.caller, idempotency.c.request_id, *_LOOKUP.selected_columns)


def lookup(conn: Connection, caller: str, request_id: str) -> StoredOutcome | None:
    row = conn.execute(_LOOKUP, {"caller": caller, "request_id": request_id}).one_or_none()
    if row is None:
        return None
    return StoredOutcome(*row)


def claim(conn: Connection, caller: str, request_id: str, method: str, request_sha256: str, now_ms: int) -> None:
    """Insert the pending record first: a concurrent duplicate blocks on this key, not on effects."""
    conn.execute(
        _CLAIM,
        {
            "caller": caller,
            "request_id": request_id,
            "method": method,
            "request_sha256": request_sha256,
            "created_at_ms": now_ms,
        },
    )


def settle_ok(conn: Connection, caller: str, request_id: str, result: bytes) -> None:
    conn.execute(_SETTLE_OK, {"b_caller": caller, "b_request_id": request_id, "result": result})


def settle_error(
    conn: Connection, caller: str, request_id: str, category: str, reason: str, message: str, metadata: dict[str, str]
) -> None:
    conn.execute(
        update(idempotency)
        .where(idempotency.c.caller == caller, idempotency.c.request_id == request_id)
        .values(
            outcome="error",
            error_category=category,
            error_reason=reason,
            error_message=message,
            error_metadata=json.dumps(metadata, sort_keys=True),
        )
    )


def lookup_many(conn: Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], StoredOutcome]:
    """The stored outcomes of many (caller, request_id) keys, in one query (a batch's replays)."""
    if not keys:
        return {}
    statement, params = lookup_query(conn, keys)
    return outcomes_of(conn.execute(statement, params).all())


def lookup_query(conn: Connection, keys: list[tuple[str, str]]) -> tuple[Any, dict[str, Any]]:
    """The read of `lookup_many`, to send with others (`dialect.read_all`)."""
    return bulk.by_keys(conn, _LOOKUP_MANY, idempotency, ("caller", "request_id"), sorted(set(keys)))


def outcomes_of(rows: Iterable[Any]) -> dict[tuple[str, str], StoredOutcome]:
    return {(row[0], row[1]): StoredOutcome(*row[2:]) for row in rows}


@dataclass(frozen=True)
class Settled:
    """A request's final record, written in one go with its batch: no pending claim first."""

    caller: str
    request_id: str
    method: str
    request_sha256: str
    created_at_ms: int
    result: bytes | None = None  # set on success: the canonical domain result
    error: tuple[str, str, str, dict[str, str]] | None = None  # (category, reason, message, metadata)


def record_many(conn: Connection, settled: list[Settled]) -> None:
    """Insert many final records in one statement. A key someone else holds raises IntegrityError:
    the whole batch then falls back to one request at a time, where twins are resolved."""
    if not settled:
        return
    bulk.insert_rows(
        conn,
        idempotency,
        [
            {
                "caller": s.caller,
                "request_id": s.request_id,
                "method": s.method,
                "request_sha256": s.request_sha256,
                "outcome": "ok" if s.error is None else "error",
                "result": s.result,
                "error_category": None if s.error is None else s.error[0],
                "error_reason": None if s.error is None else s.error[1],
                "error_message": None if s.error is None else s.error[2],
                "error_metadata": None if s.error is None else json.dumps(s.error[3], sort_keys=True),
                "created_at_ms": s.created_at_ms,
            }
            for s in settled
        ],
    )
