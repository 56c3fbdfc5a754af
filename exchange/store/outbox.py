"""The event outbox behind StreamEvents: events are staged by the effect and written under the
key of the transaction's audit record, in the same commit as the change they report.

Nothing is announced that did not commit (a refused effect's staged events are dropped with its
savepoint) and nothing that committed goes unannounced. Keys `(audit_seq, idx)` follow commit
order because audit sequence numbers are handed out under the audit head's row lock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, literal, select, tuple_

from exchange.domain.events import (
    CONVERSION_IN,
    CONVERSION_OUT,
    MAX_IDX,
    POINT_VALUE_CHANGED,
    REVERSAL,
    STATEMENT_READY,
    StagedEvent,
    StoredEvent,
    format_cursor,
    parse_cursor,
)
from exchange.store import bulk
from exchange.store.schema import audit_head, events

__all__ = [
    "CONVERSION_IN", "CONVERSION_OUT", "MAX_IDX", "POINT_VALUE_CHANGED", "REVERSAL", "STATEMENT_READY",
    "StagedEvent", "StoredEvent", "begin", "discard", "emit", "flush", "format_cursor", "head_position",
    "parse_cursor", "read_after", "take", "write_many",
]  # fmt: skip
_STAGED = "pointsx_outbox"


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
