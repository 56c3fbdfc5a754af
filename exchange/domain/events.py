"""Events as the hub announces them (StreamEvents): what happened, to whom, and where in the stream.

Events are staged by a write and stored under its audit record's key in the same commit
(exchange/store/outbox.py); a cursor `audit_seq.idx` names a place in the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.domain import errors

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
