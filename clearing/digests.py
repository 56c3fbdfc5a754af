"""Each merchant's item count and `items_sha256` for one cycle (DESIGN §5), memory flat in items.

The hash is over the merchant's item lines in operation-id order. The lines are built by the
database; they stream once, in id order, through hashlib, each conversion feeding both sides'
hashes at once — one open hash per merchant, no sort of the items per merchant (PostgreSQL's
`string_agg(… ORDER BY id)` per merchant cost twice as much). Reversals, few, are merged in by id.
The tests check the result against what `ListStatementItems` serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Select, and_, select

from clearing import items as items_mod
from exchange.store.schema import conversions, operations
from exchange.store.streaming import stream_rows

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _conversion_lines(window: items_mod.Window, dialect: str) -> Select[Any]:
    """(id, source, destination, source's line, destination's line) of the window's conversions."""
    c = conversions.c
    return (
        select(
            c.operation_seq,
            c.source_merchant_id,
            c.destination_merchant_id,
            items_mod.line_of(
                c.operation_seq, items_mod.OUT, c.destination_merchant_id, c.src_points, c.src_cash_micros, dialect
            ),
            items_mod.line_of(
                c.operation_seq, items_mod.IN, c.source_merchant_id, c.dst_points, c.dst_cash_micros, dialect
            ),
        )
        .where(and_(c.currency == window.currency, *items_mod.in_window(window, c.created_at_ms, c.operation_seq)))
        .order_by(c.operation_seq)
    )


def _reversal_lines(window: items_mod.Window, dialect: str) -> Select[Any]:
    """The same for the window's reversals: the mirror, `in` for the source and `out` for the destination."""
    c, o = conversions.c, operations.c
    return (
        select(
            o.operation_seq,
            c.source_merchant_id,
            c.destination_merchant_id,
            items_mod.line_of(
                o.operation_seq, items_mod.IN, c.destination_merchant_id, c.src_points, c.src_cash_micros, dialect
            ),
            items_mod.line_of(
                o.operation_seq, items_mod.OUT, c.source_merchant_id, c.dst_points, c.dst_cash_micros, dialect
            ),
        )
        .select_from(conversions.join(operations, o.operation_seq == c.reversal_operation_seq))
        .where(
            items_mod.IS_REVERSAL,
            o.currency == window.currency,
            *items_mod.in_window(window, o.created_at_ms, o.operation_seq),
        )
        .order_by(o.operation_seq)
    )


def item_digests(conn: Connection, window: items_mod.Window) -> dict[str, tuple[int, str]]:
    """{merchant: (item count, items_sha256)} for every merchant with items in the window."""
    if window.first_seq is None:
        return {}  # nothing in the window
    dialect = conn.engine.dialect.name
    hashes: dict[str, Any] = {}
    counts: dict[str, int] = {}
    rows = _merged(
        stream_rows(conn, _conversion_lines(window, dialect)), stream_rows(conn, _reversal_lines(window, dialect))
    )
    for _seq, source, destination, source_line, destination_line in rows:
        for merchant, line in ((source, source_line), (destination, destination_line)):
            digest = hashes.get(merchant)
            if digest is None:
                digest = hashes[merchant] = hashlib.sha256()
                counts[merchant] = 0
            digest.update(line.encode())
            counts[merchant] += 1
    return {m: (counts[m], digest.hexdigest()) for m, digest in hashes.items()}


def _merged(first: Iterator[tuple[Any, ...]], second: Iterator[tuple[Any, ...]]) -> Iterator[tuple[Any, ...]]:
    """Two streams, each in id order, as one in id order (ids are unique across both)."""
    pending = next(second, None)
    for row in first:
        while pending is not None and pending[0] < row[0]:
            yield pending
            pending = next(second, None)
        yield row
    while pending is not None:
        yield pending
        pending = next(second, None)
