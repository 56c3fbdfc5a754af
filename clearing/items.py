"""A cycle's statement items, straight from the ledger's conversion records.

A conversion S -> D is an `out` item for S (src points, src_cash) and an `in` item for D (dst
points, dst_cash); its reversal is the mirror (`in` for S, `out` for D) under the reversal's own
operation id, in the cycle the reversal lands in. Everything here is one SQL query: clearing
aggregates in the database, never by loading operations into Python.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Select, String, and_, cast, func, literal, select, union_all
from sqlalchemy.sql import Subquery

from exchange.store.schema import conversions, operations

OUT, IN = "out", "in"


def _branch(cycle_id: str, *, reversal: bool, side: str, merchant_id: str | None, after_seq: int | None) -> Select[Any]:
    c, o = conversions.c, operations.c
    join_on = o.operation_seq == (c.reversal_operation_seq if reversal else c.operation_seq)
    source_side = side == "source"
    merchant = c.source_merchant_id if source_side else c.destination_merchant_id
    counterparty = c.destination_merchant_id if source_side else c.source_merchant_id
    # The source pays on a conversion and is repaid on its reversal; the destination the reverse.
    direction = (OUT if source_side else IN) if not reversal else (IN if source_side else OUT)
    points = c.src_points if source_side else c.dst_points
    cash = c.src_cash_micros if source_side else c.dst_cash_micros
    where: list[ColumnElement[bool]] = [o.cycle_id == cycle_id]
    if merchant_id is not None:
        where.append(merchant == merchant_id)
    if after_seq is not None:
        where.append(o.operation_seq > after_seq)
    return (
        select(
            merchant.label("merchant_id"),
            counterparty.label("counterparty"),
            cast(literal(direction), String(3)).label("direction"),
            points.label("points"),
            cash.label("cash_micros"),
            cast(o.operation_seq, BigInteger).label("operation_seq"),
        )
        .select_from(conversions.join(operations, join_on))
        .where(and_(*where))
    )


def items(cycle_id: str, *, merchant_id: str | None = None, after_seq: int | None = None) -> Subquery:
    return union_all(
        *(
            _branch(cycle_id, reversal=reversal, side=side, merchant_id=merchant_id, after_seq=after_seq)
            for reversal in (False, True)
            for side in ("source", "destination")
        )
    ).subquery("items")


def counterparty_totals(cycle_id: str) -> Select[Any]:
    """(merchant, counterparty, payable, receivable) per pair: the statement's breakdown and totals."""
    item = items(cycle_id)
    return select(
        item.c.merchant_id,
        item.c.counterparty,
        func.coalesce(func.sum(item.c.cash_micros).filter(item.c.direction == OUT), 0).label("payable"),
        func.coalesce(func.sum(item.c.cash_micros).filter(item.c.direction == IN), 0).label("receivable"),
    ).group_by(item.c.merchant_id, item.c.counterparty)


def platform_fees(cycle_id: str) -> Select[Any]:
    """Fees and residues of the cycle's conversions, less those its reversals gave back."""
    c, o = conversions.c, operations.c
    margin = c.src_cash_micros - c.dst_cash_micros
    kept = (
        select(func.coalesce(func.sum(margin), 0))
        .select_from(conversions.join(operations, o.operation_seq == c.operation_seq))
        .where(o.cycle_id == cycle_id)
        .scalar_subquery()
    )
    returned = (
        select(func.coalesce(func.sum(margin), 0))
        .select_from(conversions.join(operations, o.operation_seq == c.reversal_operation_seq))
        .where(o.cycle_id == cycle_id)
        .scalar_subquery()
    )
    return select((kept - returned).label("fees"))


def item_line(item: Subquery, dialect: str) -> ColumnElement[str]:
    """The item's line `operation_id,direction,counterparty,points,cash_micros\\n`, built in SQL.

    Byte for byte what `clearing.statement.StatementItem.line` makes (tests compare the two).
    """
    if dialect == "sqlite":
        return func.printf(
            "op_%016d,%s,%s,%d,%d\n",
            item.c.operation_seq,
            item.c.direction,
            item.c.counterparty,
            item.c.points,
            item.c.cash_micros,
        )
    return (
        literal("op_")
        + func.lpad(cast(item.c.operation_seq, String), 16, "0")
        + ","
        + item.c.direction
        + ","
        + item.c.counterparty
        + ","
        + cast(item.c.points, String)
        + ","
        + cast(item.c.cash_micros, String)
        + literal("\n")
    )
