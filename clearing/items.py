"""A cycle's statement items, straight from the ledger's conversion records.

A conversion S -> D is an `out` item for S (src points, src_cash) and an `in` item for D (dst
points, dst_cash); its reversal is the mirror (`in` for S, `out` for D) under the reversal's own
operation id, in the cycle the reversal lands in. A cycle holds what its currency stamped inside
its window (exchange/store/fences.py says why that is exact). Everything here is one SQL query:
clearing aggregates in the database, never by loading operations into Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    and_,
    cast,
    func,
    literal,
    literal_column,
    select,
    union_all,
)
from sqlalchemy.sql import Subquery

from exchange.store.schema import conversions, operations

OUT, IN = "out", "in"
# A literal, not a bound parameter: SQLite uses the partial reversal index only for the very term.
IS_REVERSAL = operations.c.kind == literal_column("'reversal'")


@dataclass(frozen=True)
class Window:
    """What one cycle clears: operations of `currency` stamped in [start_ms, cutoff_ms).

    `first_seq`/`last_seq` bound the operation ids inside it once the cycle is closed; they only
    narrow index scans, membership is the stamp.
    """

    currency: str
    start_ms: int
    cutoff_ms: int
    first_seq: int | None = None
    last_seq: int | None = None


def in_window(window: Window, stamp: Any, seq: Any) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = [stamp >= window.start_ms, stamp < window.cutoff_ms]
    if window.first_seq is not None and window.last_seq is not None:
        where += [seq >= window.first_seq, seq <= window.last_seq]
    return where


def _branch(
    window: Window, *, reversal: bool, side: str, merchant_id: str | None, after_seq: int | None
) -> Select[Any]:
    c, o = conversions.c, operations.c
    source_side = side == "source"
    merchant = c.source_merchant_id if source_side else c.destination_merchant_id
    counterparty = c.destination_merchant_id if source_side else c.source_merchant_id
    # The source pays on a conversion and is repaid on its reversal; the destination the reverse.
    direction = (OUT if source_side else IN) if not reversal else (IN if source_side else OUT)
    points = c.src_points if source_side else c.dst_points
    cash = c.src_cash_micros if source_side else c.dst_cash_micros
    if reversal:
        # The reversal's own operation: its stamp and id place it, whatever the conversion's were.
        seq: Any = o.operation_seq
        source: Any = conversions.join(operations, o.operation_seq == c.reversal_operation_seq)
        where = [IS_REVERSAL, o.currency == window.currency, *in_window(window, o.created_at_ms, seq)]
    elif merchant_id is not None and source_side:
        # One merchant's outbound conversions are its own operations: walk them in id order.
        seq = o.operation_seq
        source = conversions.join(operations, o.operation_seq == c.operation_seq)
        where = [o.merchant_id == merchant_id, o.kind == "convert", c.currency == window.currency]
        where += in_window(window, c.created_at_ms, seq)
    else:
        # The conversion record carries its own stamp: the whole window without a join.
        seq = c.operation_seq
        source = conversions
        where = [c.currency == window.currency, *in_window(window, c.created_at_ms, seq)]
    if merchant_id is not None:
        where.append(merchant == merchant_id)
    if after_seq is not None:
        where.append(seq > after_seq)
    return (
        select(
            merchant.label("merchant_id"),
            counterparty.label("counterparty"),
            cast(literal(direction), String(3)).label("direction"),
            points.label("points"),
            cash.label("cash_micros"),
            cast(seq, BigInteger).label("operation_seq"),
        )
        .select_from(source)
        .where(and_(*where))
    )


SIDES = ("source", "destination")


def items(
    window: Window,
    *,
    merchant_id: str | None = None,
    after_seq: int | None = None,
    sides: tuple[str, ...] = SIDES,
) -> Subquery:
    """The window's items; `sides` picks the source side's items, the destination side's, or both."""
    return union_all(
        *(
            _branch(window, reversal=reversal, side=side, merchant_id=merchant_id, after_seq=after_seq)
            for reversal in (False, True)
            for side in sides
        )
    ).subquery("items")


def merchant_totals(window: Window) -> Select[Any]:
    """(merchant, payable, receivable) per merchant with items: what netting starts from."""
    item = items(window)
    return select(
        item.c.merchant_id,
        func.coalesce(func.sum(item.c.cash_micros).filter(item.c.direction == OUT), 0).label("payable"),
        func.coalesce(func.sum(item.c.cash_micros).filter(item.c.direction == IN), 0).label("receivable"),
    ).group_by(item.c.merchant_id)


def counterparty_totals(window: Window, side: str) -> Select[Any]:
    """(merchant, counterparty, payable, receivable) per pair, from one side's items only.

    Summed per side, a pair S -> D is one group of the window's conversions (not two of a union of
    both sides): the aggregate reads each conversion once. The caller adds the two sides up.
    """
    item = items(window, sides=(side,))
    return select(
        item.c.merchant_id,
        item.c.counterparty,
        func.coalesce(func.sum(item.c.cash_micros).filter(item.c.direction == OUT), 0).label("payable"),
        func.coalesce(func.sum(item.c.cash_micros).filter(item.c.direction == IN), 0).label("receivable"),
    ).group_by(item.c.merchant_id, item.c.counterparty)


def window_facts(window: Window) -> Select[Any]:
    """(operation count, first id, last id, earliest stamp, platform fees) of the window, in one query.

    Fees are the fees and residues of the window's conversions, less what its reversals gave back.
    """
    c, o = conversions.c, operations.c
    margin = c.src_cash_micros - c.dst_cash_micros
    kept = select(c.operation_seq.label("seq"), c.created_at_ms.label("stamp"), margin.label("margin")).where(
        c.currency == window.currency, *in_window(window, c.created_at_ms, c.operation_seq)
    )
    returned = (
        select(o.operation_seq.label("seq"), o.created_at_ms.label("stamp"), (-margin).label("margin"))
        .select_from(conversions.join(operations, o.operation_seq == c.reversal_operation_seq))
        .where(IS_REVERSAL, o.currency == window.currency, *in_window(window, o.created_at_ms, o.operation_seq))
    )
    both = union_all(kept, returned).subquery("window_operations")
    return select(
        func.count(),
        func.min(both.c.seq),
        func.max(both.c.seq),
        func.min(both.c.stamp),
        func.coalesce(func.sum(both.c.margin), 0),
    )


def item_line(item: Subquery, dialect: str) -> ColumnElement[str]:
    """The item's line `operation_id,direction,counterparty,points,cash_micros\\n`, built in SQL."""
    c = item.c
    return line_of(c.operation_seq, c.direction, c.counterparty, c.points, c.cash_micros, dialect)


def line_of(seq: Any, direction: Any, counterparty: Any, points: Any, cash: Any, dialect: str) -> ColumnElement[str]:
    """One item line from its five parts, in SQL.

    Byte for byte what `clearing.statement.StatementItem.line` makes (tests compare the two).
    """
    if isinstance(direction, str):
        direction = literal(direction)
    if dialect == "sqlite":
        return func.printf("op_%016d,%s,%s,%d,%d\n", seq, direction, counterparty, points, cash, type_=String)
    line: ColumnElement[str] = (
        literal("op_")
        + func.lpad(cast(seq, String), 16, "0")
        + ","
        + direction
        + ","
        + counterparty
        + ","
        + cast(points, String)
        + ","
        + cast(cash, String)
        + literal("\n")
    )
    return line
