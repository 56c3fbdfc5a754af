"""Runs one mutating request exactly once: idempotency record, effect and audit in one commit.

The effect is a callable on an open write transaction that returns the request's domain result
(a registered dataclass, exchange/domain/outcomes.py), stored canonically so a retry gets the same
result and the edge encodes it to the same bytes. A domain refusal is stored as the request's
outcome too (its effects rolled back to a savepoint), so a retry with the same request_id gets
the same answer and never a second effect. `apply` does it
inside a transaction somebody else owns (the group-commit writer's batch, `exchange/store/writer.py`);
`run_alone` in a transaction of its own, retried on transient conflicts.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from exchange.domain import errors, outcomes
from exchange.domain.requests import MutationContext
from exchange.store import audit, bulk, dialect, idempotency, nonces, outbox
from exchange.store.engine import write_transaction

MAX_ATTEMPTS = 6
# PostgreSQL serialization failure and deadlock; both mean "run the whole transaction again".
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


class StoredError(errors.DomainError):
    """A refusal replayed from the idempotency record: same category, reason and message."""

    def __init__(self, category: str, reason: str, message: str, metadata: dict[str, str]) -> None:
        super().__init__(message, **metadata)
        self.stored_category = category
        self.stored_reason = reason


__all__ = ["MutationContext", "StoredError", "apply", "apply_many", "run_alone", "run_mutation", "together"]

# What a write answers: its domain result (or a reply stored before results were), or its refusal.
Result = Any


def _replay(stored: idempotency.StoredOutcome, ctx: MutationContext) -> Result | errors.DomainError:
    if stored.request_sha256 != ctx.content_sha256 or stored.method != ctx.method:
        return _reused(ctx)
    if stored.outcome == "ok" and stored.result is not None:
        return outcomes.decode(stored.result)
    if stored.outcome == "ok" and stored.response is not None:
        return outcomes.LegacyReply(stored.response)
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


def outcome(result: Result | errors.DomainError) -> Result:
    """The result, or the refusal raised for the caller."""
    if isinstance(result, errors.DomainError):
        raise result
    return result


def run_mutation(engine: Engine, ctx: MutationContext, effect: Callable[[Connection], Result]) -> Result:
    """One mutation in a transaction of its own; raises its refusal."""
    return outcome(run_alone(engine, ctx, effect))


def run_alone(
    engine: Engine, ctx: MutationContext, effect: Callable[[Connection], Result]
) -> Result | errors.DomainError:
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
                if ctx.nonce is not None and not nonces.remember_in(conn, *ctx.nonce):
                    return nonces.replayed()
                stored = idempotency.lookup(conn, ctx.caller, ctx.request_id)
            if stored is None:
                raise
            return _replay(stored, ctx)
        except DBAPIError as exc:
            if attempt == MAX_ATTEMPTS or not is_retryable(exc):
                raise
            time.sleep(random.uniform(0, 0.005 * 2**attempt))
    raise AssertionError("unreachable")


def _audit_entry(ctx: MutationContext, stored: bytes) -> audit.AuditEntry:
    """The record of a success; `response_sha256` is the hash of its stored (canonical) result."""
    return audit.AuditEntry(
        at_ms=ctx.now_ms,
        caller=ctx.caller,
        key_id=ctx.key_id,
        signature=ctx.signature,
        method=ctx.method,
        request_id=ctx.request_id,
        request_sha256=ctx.raw_sha256,
        response_sha256=hashlib.sha256(stored).hexdigest(),
    )


# What a batch effect gives back for one request: its result or refusal, and the events it staged.
Effected = tuple[Result | errors.DomainError, list[outbox.StagedEvent]]


def apply_many(
    conn: Connection,
    ctxs: list[MutationContext],
    effect_many: Callable[[Connection, list[int]], list[Effected]],
) -> list[Result | errors.DomainError]:
    """Many mutations inside an open write transaction, with set-based idempotency and audit.

    The same contract as `apply` for each request, in a constant number of statements: one lookup
    finds the replays, `effect_many` runs the rest together (given their indices) (each keeps its own outcome), one
    insert stores every final record, and the audit chain takes the successes in one append. A
    request id repeated inside the batch runs once; its twins get that outcome (or
    REQUEST_ID_REUSED when their content differs), as they would have a moment later. Any database
    error propagates with nothing of this call left behind once the caller rolls back.
    """
    replayed, stored = _seen(conn, ctxs)
    first_of: dict[tuple[str, str], int] = {}
    to_run: list[int] = []
    for index, ctx in enumerate(ctxs):
        key = (ctx.caller, ctx.request_id)
        if index not in replayed and key not in stored and key not in first_of:
            first_of[key] = index
            to_run.append(index)
    effected = effect_many(conn, to_run) if to_run else []
    if len(effected) != len(to_run):
        raise AssertionError("a batch effect answers every request it was given")
    results: dict[int, Result | errors.DomainError] = {}
    settled: list[idempotency.Settled] = []
    successes: list[tuple[audit.AuditEntry, list[outbox.StagedEvent], int]] = []
    for index, (result, events) in zip(to_run, effected, strict=True):
        ctx = ctxs[index]
        results[index] = result
        base = (ctx.caller, ctx.request_id, ctx.method, ctx.content_sha256, ctx.now_ms)
        if isinstance(result, errors.DomainError):
            error = (result.category, result.reason, result.message, result.metadata)
            settled.append(idempotency.Settled(*base, error=error))
        else:
            stored_result = outcomes.encode(result)
            settled.append(idempotency.Settled(*base, result=stored_result))
            successes.append((_audit_entry(ctx, stored_result), events, ctx.now_ms))
    idempotency.record_many(conn, settled)
    deferred: list[tuple[audit.AuditEntry, list[outbox.StagedEvent], int]] | None = conn.info.get(_DEFERRED)
    if deferred is not None:  # a writer's batch: chained with the rest of it, at its end
        deferred.extend(successes)
    else:
        _chain(conn, successes)
    answers: list[Result | errors.DomainError] = []
    for index, ctx in enumerate(ctxs):
        key = (ctx.caller, ctx.request_id)
        if index in replayed:
            answers.append(nonces.replayed())
        elif index in results:
            answers.append(results[index])
        elif key in stored:
            answers.append(_replay(stored[key], ctx))
        else:  # a twin inside this batch: the first one's outcome, if it asked the same
            first = ctxs[first_of[key]]
            if first.content_sha256 != ctx.content_sha256 or first.method != ctx.method:
                answers.append(_reused(ctx))
            else:
                answers.append(results[first_of[key]])
    return answers


P = TypeVar("P")


def together(
    effect_many: Callable[[Connection, list[tuple[MutationContext, P]]], list[Effected]],
) -> Callable[[Connection, list[tuple[MutationContext, P]]], list[Result | errors.DomainError]]:
    """A group-commit bulk handler for one kind of request: payloads are (context, what to do).

    Build it once per kind (the writer groups items by handler identity).
    """

    def handler(conn: Connection, payloads: list[tuple[MutationContext, P]]) -> list[Result | errors.DomainError]:
        ctxs = [ctx for ctx, _ in payloads]
        return apply_many(conn, ctxs, lambda c, indices: effect_many(c, [payloads[i] for i in indices]))

    return handler


def _seen(
    conn: Connection, ctxs: list[MutationContext]
) -> tuple[set[int], dict[tuple[str, str], idempotency.StoredOutcome]]:
    """Store the nonces the batch carries and find the requests already answered, in one round
    trip: the indices of the requests whose nonce was seen before, and the stored outcomes."""
    carrying = [(i, ctx.nonce) for i, ctx in enumerate(ctxs) if ctx.nonce is not None]
    reads = [idempotency.lookup_query(conn, [(c.caller, c.request_id) for c in ctxs])]
    if carrying:
        reads.append(nonces.seen_query(conn, [nonce for _i, nonce in carrying]))
    found = dialect.read_all(conn, reads)
    if not carrying:
        return set(), idempotency.outcomes_of(found[0])
    fresh = nonces.remember_found(conn, [nonce for _i, nonce in carrying], found[1])
    return {i for (i, _nonce), new in zip(carrying, fresh, strict=True) if not new}, idempotency.outcomes_of(found[0])


def _reused(ctx: MutationContext) -> errors.DomainError:
    return errors.RequestIdReused(
        f"request_id {ctx.request_id} was already used for a different request", request_id=ctx.request_id
    )


def apply(
    conn: Connection, ctx: MutationContext, effect: Callable[[Connection], Result]
) -> Result | errors.DomainError:
    """The mutation inside an open write transaction: its result, or its refusal — stored either way.

    A refusal's partial work is rolled back to a savepoint and the refusal itself is recorded, so a
    retry gets the same answer; the caller's transaction (one request's, or a batch's) commits it.
    """
    if ctx.nonce is not None and not nonces.remember_in(conn, *ctx.nonce):
        return nonces.replayed()  # before anything else: a replayed call does nothing, not even a replay
    stored = idempotency.lookup(conn, ctx.caller, ctx.request_id)
    if stored is not None:
        return _replay(stored, ctx)
    idempotency.claim(conn, ctx.caller, ctx.request_id, ctx.method, ctx.content_sha256, ctx.now_ms)
    savepoint = conn.begin_nested()
    outbox.begin(conn)
    try:
        result = effect(conn)
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
    stored_result = outcomes.encode(result)
    idempotency.settle_ok(conn, ctx.caller, ctx.request_id, stored_result)
    entry = _audit_entry(ctx, stored_result)
    deferred: list[tuple[audit.AuditEntry, list[outbox.StagedEvent], int]] | None = conn.info.get(_DEFERRED)
    if deferred is not None:  # a batch: its audit records are chained once, at its end
        deferred.append((entry, outbox.take(conn), ctx.now_ms))
    else:
        outbox.flush(conn, audit.append(conn, entry), ctx.now_ms)
    return result


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
    with bulk.deferring(conn):  # the records, their events and the new head: one statement
        _chain(conn, conn.info.pop(_DEFERRED, None) or [])


def _chain(conn: Connection, records: list[tuple[audit.AuditEntry, list[outbox.StagedEvent], int]]) -> None:
    """Append the records to the audit chain in one go and write each one's events under its seq."""
    seqs = audit.append_many(conn, [entry for entry, _events, _now in records])
    outbox.write_many(conn, [(seq, events, now) for seq, (_entry, events, now) in zip(seqs, records, strict=True)])


def forget_deferred(conn: Connection) -> None:
    conn.info.pop(_DEFERRED, None)
