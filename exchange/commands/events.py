"""The event stream: where it stands now, and a merchant's events after a cursor."""

from __future__ import annotations

from dataclasses import dataclass

from exchange.domain.events import StoredEvent
from exchange.domain.models import ConversionRecord
from exchange.hub import Hub
from exchange.ledger import conversions
from exchange.store import outbox


@dataclass(frozen=True)
class EventItem:
    """One stored event and, for a conversion or reversal, the conversion it is about."""

    stored: StoredEvent
    conversion: ConversionRecord | None


async def head(hub: Hub) -> tuple[int, int]:
    """The stream's position now: a stream started here sees only what commits from now on."""
    return await hub.query(lambda conn, _now: outbox.head_position(conn))


async def after(hub: Hub, merchant_id: str, position: tuple[int, int], limit: int) -> list[EventItem]:
    """Up to `limit` of the merchant's events after `position`, oldest first."""

    def read(conn, _now):  # type: ignore[no-untyped-def]
        stored = outbox.read_after(conn, merchant_id, position, limit)
        seqs = [s.event.conversion_seq for s in stored if s.event.conversion_seq is not None]
        records = conversions.get_many(conn, seqs) if seqs else {}
        return [
            EventItem(s, None if s.event.conversion_seq is None else records[s.event.conversion_seq]) for s in stored
        ]

    return await hub.query(read)  # type: ignore[no-any-return]
