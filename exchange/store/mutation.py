"""Runs one mutating request exactly once: idempotency record, effect and audit in one commit.

The effect is a callable on an open write transaction that returns the response bytes; a
domain refusal is stored as the request's outcome too (its effects rolled back to a savepoint), so
a retry with the same request_id gets the same answer and never a second effect. `apply` does it
inside a transaction somebody else owns (the group-commit writer's batch, `exchange/store/writer.py`);
`run_alone` in a transaction of its own, retried on transient conflicts.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from exchange.domain import errors
from exchange.store import audit, idempotency, outbox
from exchange.store.engine import write_transaction

MAX_ATTEMPTS = 6
# PostgreSQL serialization failure and deadlock; both mean "run the whole transaction again".
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


@dataclass(frozen=True)
class MutationContext:
    caller: str
    key_id: str
    signature: str
    method: str
    request_id: str
    content_sha256: str  # hash of the request's content (method + deterministic encoding)
    raw_sha256: str  # hash of the bytes as received (the signed digest)
    now_ms: int


class StoredError(errors.DomainError):
    """A refusal replayed from the idempotency record: same category, reason and message."""

    def __init__(self, category: str, reason: str, message: str, metadata: dict[str, str]) -> None:
        super().__init__(message, **metadata)
        self.stored_category = category
        self.stored_reason = reason


def _replay(stored: idempotency.StoredOutcome, ctx: MutationContext) -> bytes | errors.DomainError:
    if stored.request_sha256 != ctx.content_sha256 or stored.method != ctx.method:
        return errors.RequestIdReused(
            f"request_id {ctx.request_id} was already used for a different request", request_id=ctx.request_id
        )
    if stored.outcome == "ok" and stored.response is not None:
        return stored.response
    if stored.outcome == "error":
        metadata = json.loads(stored.error_metadata) if stored.error_metadata else {}
        return StoredError(stored.error_category or "", stored.error_reason or "", stored.error_message or "", metadata)
    raise AssertionError(f"idempotency record in state {stored.outcome!r} after commit")  # never committed so


def is_retryable(exc: DBAPIError) -> bool:
    """A conflict that running the whole transaction again resolves: deadlock, serialization, busy."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig)


def is_twin_claim(exc: IntegrityError) -> bool:
    """A concurrent twin (same caller and request_id) claimed the idempotency record first."""
    return "idempotency" in str(exc.orig).lower()


def outcome(result: bytes | errors.DomainError) -> bytes:
    """The response, or the refusal raised for the caller."""
    if isinstance(result, errors.DomainError):
        raise result
    return result


def run_mutation(engine: Engine, ctx: MutationContext, effect: Callable[[Connection], bytes]) -> bytes:
    """One mutation in a transaction of its own; raises its refusal."""
    return outcome(run_alone(engine, ctx, effect))


def run_alone(
    engine: Engine, ctx: MutationContext, effect: Callable[[Connection], bytes]
) -> bytes | errors.DomainError:
    """Bounded retries with jitter on transient database conflicts; everything else surfaces."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with write_transaction(engine) as conn:
                return apply(conn, ctx, effect)
        except IntegrityError as exc:
            # A concurrent twin claimed the same (caller, request_id) first: its outcome is ours.
            if not is_twin_claim(exc):
                raise
            with write_transaction(engine) as conn:
                stored = idempotency.lookup(conn, ctx.caller, ctx.request_id)
            if stored is None:
                raise
            return _replay(stored, ctx)
        except DBAPIError as exc:
            if attempt == MAX_ATTEMPTS or not is_retryable(exc):
                raise
            time.sleep(random.uniform(0, 0.005 * 2**attempt))
    raise AssertionError("unreachable")


def apply(conn: Connection, ctx: MutationContext, effect: Callable[[Connection], bytes]) -> bytes | errors.DomainError:
    """The mutation inside an open write transaction: its response, or its refusal — stored either way.

    A refusal's partial work is rolled back to a savepoint and the refusal itself is recorded, so a
    retry gets the same answer; the caller's transaction (one request's, or a batch's) commits it.
    """
    stored = idempotency.lookup(conn, ctx.caller, ctx.request_id)
    if stored is not None:
        return _replay(stored, ctx)
    idempotency.claim(conn, ctx.caller, ctx.request_id, ctx.method, ctx.content_sha256, ctx.now_ms)
    savepoint = conn.begin_nested()
    outbox.begin(conn)
    try:
        response = effect(conn)
    except errors.DomainError as refusal:
        savepoint.rollback()
        outbox.discard(conn)
        idempotency.settle_error(
            conn, ctx.caller, ctx.request_id, refusal.category, refusal.reason, refusal.message, refusal.metadata
        )
        return refusal
    except BaseException:
        # A database error (or a bug): undo this savepoint here, so whoever owns the transaction
        # (the writer's batch rolls back its item; a lone request its transaction) finds it closed.
        outbox.discard(conn)
        if savepoint.is_active:
            savepoint.rollback()
        raise
    savepoint.commit()
    idempotency.settle_ok(conn, ctx.caller, ctx.request_id, response)
    entry = audit.AuditEntry(
        at_ms=ctx.now_ms,
        caller=ctx.caller,
        key_id=ctx.key_id,
        signature=ctx.signature,
        method=ctx.method,
        request_id=ctx.request_id,
        request_sha256=ctx.raw_sha256,
        response_sha256=hashlib.sha256(response).hexdigest(),
    )
    deferred: list[tuple[audit.AuditEntry, list[outbox.StagedEvent], int]] | None = conn.info.get(_DEFERRED)
    if deferred is not None:  # a batch: its audit records are chained once, at its end
        deferred.append((entry, outbox.take(conn), ctx.now_ms))
    else:
        outbox.flush(conn, audit.append(conn, entry), ctx.now_ms)
    return response


_DEFERRED = "pointsx_deferred_audit"


def defer_audit(conn: Connection) -> None:
    """From now on in this transaction, `apply` queues its audit record and events (a batch's)."""
    conn.info[_DEFERRED] = []


def write_deferred(conn: Connection) -> None:
    """Chain the queued audit records and write their events, just before the batch commits.

    Why last: the audit head is the one row every write takes. Taken at the end, a batch takes it
    after all its member and position rows, in the same order as a lone write or a clearing close
    (rows, then the head) — so batches and closes never wait on each other in a cycle, and the
    head is held only for the end of each batch.
    """
    deferred = conn.info.pop(_DEFERRED, None) or []
    for entry, staged, now_ms in deferred:
        outbox.write(conn, audit.append(conn, entry), staged, now_ms)


def forget_deferred(conn: Connection) -> None:
    conn.info.pop(_DEFERRED, None)
