"""Each merchant's items of one cycle summed up: count, `items_sha256` (DESIGN §5), payable and
receivable — in one pass, memory flat in items.

The hash is over the merchant's item lines in operation-id order. The lines are built by the
database; they stream once, in id order, through hashlib, each conversion feeding both sides'
hashes and totals at once — one open hash per merchant, no sort of the items per merchant
(PostgreSQL's `string_agg(… ORDER BY id)` per merchant cost twice as much). Reversals, few, are
merged in by id. The tests check the result against what `ListStatementItems` serves.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, and_, literal, select

from clearing import items as items_mod
from exchange.store import dialect
from exchange.store.schema import conversions, operations
from exchange.store.streaming import stream_rows

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class MerchantItems:
    """What a merchant's statement says of its items: how many, their hash, what they add up to."""

    count: int
    items_sha256: str
    payable: int
    receivable: int


NO_ITEMS = MerchantItems(0, EMPTY_SHA256, 0, 0)
_CONVERSION, _REVERSAL = 0, 1


def _conversion_lines(window: items_mod.Window, flavour: str) -> Select[Any]:
    """(id, kind, source, destination, src_cash, dst_cash, source's line, destination's line)."""
    c = conversions.c
    return (
        select(
            c.operation_seq,
            literal(_CONVERSION),
            c.source_merchant_id,
            c.destination_merchant_id,
            c.src_cash_micros,
            c.dst_cash_micros,
            items_mod.line_of(
                c.operation_seq, items_mod.OUT, c.destination_merchant_id, c.src_points, c.src_cash_micros, flavour
            ),
            items_mod.line_of(
                c.operation_seq, items_mod.IN, c.source_merchant_id, c.dst_points, c.dst_cash_micros, flavour
            ),
        )
        .where(and_(c.currency == window.currency, *items_mod.in_window(window, c.created_at_ms, c.operation_seq)))
        .order_by(c.operation_seq)
    )


def _reversal_lines(window: items_mod.Window, flavour: str) -> Select[Any]:
    """The same for the window's reversals: the mirror, `in` for the source and `out` for the destination."""
    c, o = conversions.c, operations.c
    return (
        select(
            o.operation_seq,
            literal(_REVERSAL),
            c.source_merchant_id,
            c.destination_merchant_id,
            c.src_cash_micros,
            c.dst_cash_micros,
            items_mod.line_of(
                o.operation_seq, items_mod.IN, c.destination_merchant_id, c.src_points, c.src_cash_micros, flavour
            ),
            items_mod.line_of(
                o.operation_seq, items_mod.OUT, c.source_merchant_id, c.dst_points, c.dst_cash_micros, flavour
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


def merchant_items(conn: Connection, window: items_mod.Window) -> dict[str, MerchantItems]:
    """Every merchant with items in the window, with what its statement says of them."""
    if window.first_seq is None:
        return {}  # nothing in the window
    flavour = dialect.sql_flavour(conn)
    hashes: dict[str, Any] = {}
    counts: dict[str, int] = defaultdict(int)
    payable: dict[str, int] = defaultdict(int)
    receivable: dict[str, int] = defaultdict(int)
    rows = _merged(
        stream_rows(conn, _conversion_lines(window, flavour)), stream_rows(conn, _reversal_lines(window, flavour))
    )
    for _seq, kind, source, destination, src_cash, dst_cash, source_line, destination_line in rows:
        # A conversion: the source pays src_cash, the destination is owed dst_cash; a reversal mirrors it.
        if kind == _CONVERSION:
            payable[source] += src_cash
            receivable[destination] += dst_cash
        else:
            receivable[source] += src_cash
            payable[destination] += dst_cash
        for merchant, line in ((source, source_line), (destination, destination_line)):
            digest = hashes.get(merchant)
            if digest is None:
                digest = hashes[merchant] = hashlib.sha256()
            digest.update(line.encode())
            counts[merchant] += 1
    return {m: MerchantItems(counts[m], h.hexdigest(), payable[m], receivable[m]) for m, h in hashes.items()}


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
