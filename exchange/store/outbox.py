"""The event outbox behind StreamEvents: events are staged by the effect and written under the
key of the transaction's audit record, in the same commit as the change they report.

Nothing is announced that did not commit (a refused effect's staged events are dropped with its
savepoint) and nothing that committed goes unannounced. Keys `(audit_seq, idx)` follow commit
order because audit sequence numbers are handed out under the audit head's row lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, literal, select, tuple_

from exchange.domain import errors
from exchange.store import bulk
from exchange.store.schema import audit_head, events

_STAGED = "pointsx_outbox"
MAX_IDX = 2**31 - 1

CONVERSION_IN = "conversion_in"
CONVERSION_OUT = "conversion_out"
REVERSAL = "reversal"
POINT_VALUE_CHANGED = "point_value_changed"
STATEMENT_READY = "statement_ready"


@dataclass(frozen=True)
class StagedEvent:
    merchant_id: str  # who receives it
    event_type: str
    subject_merchant_id: str  # whose conversion, value or statement it is about
    conversion_seq: int | None = None
    value_micros: int | None = None
    effective_at_ms: int | None = None
    cycle_id: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    audit_seq: int
    idx: int
    event: StagedEvent
    created_at_ms: int

    @property
    def cursor(self) -> str:
        return format_cursor(self.audit_seq, self.idx)


@dataclass
class _Staging:
    items: list[StagedEvent] = field(default_factory=list)


def begin(conn: Connection) -> None:
    conn.info[_STAGED] = _Staging()


def discard(conn: Connection) -> None:
    conn.info.pop(_STAGED, None)


def emit(conn: Connection, event: StagedEvent) -> None:
    """Stage an event; it is written only if the surrounding mutation commits its effect."""
    staging = conn.info.get(_STAGED)
    if staging is None:
        raise AssertionError("events are emitted only inside a mutation")
    staging.items.append(event)


def take(conn: Connection) -> list[StagedEvent]:
    """The events the effect staged, to be written later under its audit record (`write`)."""
    staging: _Staging | None = conn.info.pop(_STAGED, None)
    return [] if staging is None else staging.items


def flush(conn: Connection, audit_seq: int, now_ms: int) -> None:
    write_many(conn, [(audit_seq, take(conn), now_ms)])


def write_many(conn: Connection, batches: list[tuple[int, list[StagedEvent], int]]) -> None:
    """The events of many audit records, (audit_seq, events, now_ms) each, in one statement."""
    rows = [
        {
            "audit_seq": audit_seq,
            "idx": idx,
            "merchant_id": e.merchant_id,
            "event_type": e.event_type,
            "subject_merchant_id": e.subject_merchant_id,
            "conversion_seq": e.conversion_seq,
            "value_micros": e.value_micros,
            "effective_at_ms": e.effective_at_ms,
            "cycle_id": e.cycle_id,
            "created_at_ms": now_ms,
        }
        for audit_seq, staged, now_ms in batches
        for idx, e in enumerate(staged)
    ]
    bulk.insert_rows(conn, events, rows)


def format_cursor(audit_seq: int, idx: int) -> str:
    return f"{audit_seq}.{idx}"


def parse_cursor(cursor: str) -> tuple[int, int]:
    head, _, tail = cursor.partition(".")
    if (
        len(cursor) > 40
        or not (head.isascii() and head.isdigit() and tail.isascii() and tail.isdigit())
        or int(head) >= 2**63
        or int(tail) > MAX_IDX
    ):
        raise errors.InvalidCursor("cursor is not one this hub issued: pass an Event.cursor or empty")
    return int(head), int(tail)


def head_position(conn: Connection) -> tuple[int, int]:
    """The position just after everything committed so far: where a stream 'from now' starts."""
    seq = conn.execute(select(audit_head.c.seq).where(audit_head.c.id == 1)).scalar_one()
    return int(seq), MAX_IDX


def read_after(conn: Connection, merchant_id: str, after: tuple[int, int], limit: int) -> list[StoredEvent]:
    rows = conn.execute(
        select(events)
        .where(
            events.c.merchant_id == merchant_id,
            tuple_(events.c.audit_seq, events.c.idx) > tuple_(literal(after[0]), literal(after[1])),
        )
        .order_by(events.c.audit_seq, events.c.idx)
        .limit(limit)
    ).mappings()
    return [
        StoredEvent(
            audit_seq=int(r["audit_seq"]),
            idx=int(r["idx"]),
            event=StagedEvent(
                merchant_id=r["merchant_id"],
                event_type=r["event_type"],
                subject_merchant_id=r["subject_merchant_id"],
                conversion_seq=r["conversion_seq"],
                value_micros=r["value_micros"],
                effective_at_ms=r["effective_at_ms"],
                cycle_id=r["cycle_id"],
            ),
            created_at_ms=int(r["created_at_ms"]),
        )
        for r in rows
    ]
