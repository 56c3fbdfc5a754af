"""Retry storms: each request sent several times at once with one request_id, each copy on its own channel.

A `Case` is one mutating request (its method, message and request_id), how many copies to send,
and what one application of it does: a probe — a count or a balance read straight from the
database — and how far that must move. `storm` releases every copy of every case of a phase at
one barrier, then checks, per case:

- every copy got the same answer: the same response bytes, or the same refusal (code, reason,
  message, metadata), and the answer expected (a response, or the refusal named);
- the request applied once: the probe moved by exactly its delta (zero for a refusal), the audit
  log holds one record per applied request_id (none for a refusal), the idempotency table one
  record per request_id, and no request_id owns more than one operation;
- a retry sent afterwards, alone, gets the same answer again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message
from sqlalchemy import Connection, Engine, func, select

from exchange.store.schema import audit_log, idempotency, operations
from merchant_sdk import errors
from tests.integration.test_idempotency import RawCaller

Outcome = bytes | errors.PointsxError
Probe = Callable[[Connection], int]
BARRIER_S = 30.0


@dataclass(frozen=True)
class StormHub:
    """A hub to storm: where it listens, the operator's key, and its database (for the probes)."""

    target: str
    operator_key: Ed25519PrivateKey
    engine: Engine


@dataclass
class Case:
    """One request of a storm and what a single application of it must do."""

    name: str
    caller: str  # a merchant id, or "operator"
    method: str
    request: Message
    request_ids: tuple[str, ...]  # the request's own, or a batch's items'
    copies: int
    probe: Probe | None = None
    delta: int = 0  # how far one application moves the probe
    audited: int = 1  # audit records one application writes (one per applied request_id)
    refusal: str = ""  # the reason every copy must be refused with; "" for a response
    answers: list[Outcome] = field(default_factory=list)

    @property
    def answer(self) -> Outcome:
        return self.answers[0]

    def response_bytes(self) -> bytes:
        assert isinstance(self.answer, bytes), f"{self.name}: refused {self.answer}"
        return self.answer


def fingerprint(outcome: Outcome) -> tuple[object, ...]:
    """What two answers must share to be the same answer."""
    if isinstance(outcome, bytes):
        return ("response", outcome)
    return ("refusal", outcome.code, outcome.reason, outcome.message, tuple(sorted(outcome.metadata.items())))


def _send(caller: RawCaller, case: Case) -> Outcome:
    try:
        return caller.call(case.method, case.request)
    except errors.PointsxError as exc:
        return exc


def _counts(conn: Connection, case: Case) -> tuple[int, int, int]:
    """(audit records, idempotency records, most operations of one request_id) of the case's ids."""
    audited = conn.execute(
        select(func.count())
        .select_from(audit_log)
        .where(audit_log.c.caller == case.caller, audit_log.c.request_id.in_(case.request_ids))
    ).scalar_one()
    records = conn.execute(
        select(func.count())
        .select_from(idempotency)
        .where(idempotency.c.caller == case.caller, idempotency.c.request_id.in_(case.request_ids))
    ).scalar_one()
    most = conn.execute(
        select(func.count())
        .select_from(operations)
        .where(operations.c.caller == case.caller, operations.c.request_id.in_(case.request_ids))
        .group_by(operations.c.request_id)
        .order_by(func.count().desc())
        .limit(1)
    ).scalar_one_or_none()
    return int(audited), int(records), int(most or 0)


def storm(target: str, keys: dict[str, Ed25519PrivateKey], engine: Engine, cases: list[Case]) -> list[str]:
    """Send every copy of every case at once; the problems found (empty: all applied once, alike)."""
    with engine.connect() as conn:
        before = {c.name: c.probe(conn) for c in cases if c.probe is not None}
    channels = [[RawCaller(target, c.caller, keys[c.caller]) for _ in range(c.copies)] for c in cases]
    barrier = threading.Barrier(sum(c.copies for c in cases))

    def fire(case: Case, caller: RawCaller, slot: list[Outcome]) -> None:
        barrier.wait(BARRIER_S)
        slot.append(_send(caller, case))

    threads: list[threading.Thread] = []
    slots: list[list[list[Outcome]]] = []
    for case, callers in zip(cases, channels, strict=True):
        case_slots: list[list[Outcome]] = [[] for _ in callers]
        slots.append(case_slots)
        for caller, slot in zip(callers, case_slots, strict=True):
            threads.append(threading.Thread(target=fire, args=(case, caller, slot), name=f"storm-{case.name}"))
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        hung = sorted({t.name for t in threads if t.is_alive()})
        if hung:
            return [f"copies never answered: {hung}"]
    finally:
        for callers in channels:
            for caller in callers:
                caller.close()
    for case, case_slots in zip(cases, slots, strict=True):
        case.answers = [slot[0] for slot in case_slots]
    lost = [
        f"{c.name}: {a}"
        for c in cases
        for a in c.answers
        if isinstance(a, errors.TransientError | errors.InternalError)
    ]
    if lost:  # the hub stopped answering (or failed): no point in retrying each case for 20 s
        return [f"the hub did not answer {len(lost)} copies: {lost[:5]}"]
    return _check(target, keys, engine, cases, before)


def _snapshot(engine: Engine, cases: list[Case]) -> dict[str, tuple[int | None, tuple[int, int, int]]]:
    with engine.connect() as conn:
        return {c.name: (c.probe(conn) if c.probe is not None else None, _counts(conn, c)) for c in cases}


def _check(
    target: str, keys: dict[str, Ed25519PrivateKey], engine: Engine, cases: list[Case], before: dict[str, int]
) -> list[str]:
    problems: list[str] = []
    settled = _snapshot(engine, cases)
    for case in cases:
        problems += _check_case(case, before.get(case.name), *settled[case.name])
    for case in cases:  # a retry, alone, long after: the same answer, and nothing moves
        late = RawCaller(target, case.caller, keys[case.caller])
        try:
            if fingerprint(_send(late, case)) != fingerprint(case.answer):
                problems.append(f"{case.name}: a later retry answered differently")
        finally:
            late.close()
    after = _snapshot(engine, cases)
    problems += [f"{name}: a later retry changed {settled[name]} to {now}" for name, now in after.items()
                 if now != settled[name]]  # fmt: skip
    return problems


def _check_case(case: Case, before: int | None, probe: int | None, counts: tuple[int, int, int]) -> list[str]:
    label = f"{case.name} x{case.copies}"
    if len({fingerprint(a) for a in case.answers}) != 1:
        shown = [a if isinstance(a, errors.PointsxError) else f"{len(a)} bytes" for a in case.answers]
        return [f"{label}: copies answered differently: {shown}"]
    answer = case.answer
    if case.refusal and not (isinstance(answer, errors.PointsxError) and answer.reason == case.refusal):
        return [f"{label}: expected {case.refusal}, got {answer!r}"]
    if not case.refusal and isinstance(answer, errors.PointsxError):
        return [f"{label}: refused: {answer!r}"]
    problems: list[str] = []
    audited, records, most = counts
    once_moves, once_audits = (0, 0) if case.refusal else (case.delta, case.audited)
    if probe is not None and before is not None and probe - before != once_moves:
        problems.append(f"{label}: its effect moved {probe - before}, once is {once_moves}")
    if audited != once_audits:
        problems.append(f"{label}: {audited} audit records, once is {once_audits}")
    if records != len(case.request_ids):
        problems.append(f"{label}: {records} idempotency records for {len(case.request_ids)} request ids")
    if most > 1:
        problems.append(f"{label}: one request_id owns {most} operations")
    return problems
