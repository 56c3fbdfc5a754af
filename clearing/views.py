"""Reading closed cycles and statements back: for operators (whole cycles) and merchants (their own)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Connection, and_, func, select

from clearing import items as items_mod
from clearing.netting import CyclePosition
from clearing.statement import StatementItem
from exchange.domain import errors, outcomes
from exchange.domain.units import MINOR_UNITS, format_operation_id
from exchange.store.schema import cycle_positions, cycles, disputes, statements


@outcomes.result
@dataclass(frozen=True)
class DisputeView:
    dispute_id: str
    cycle_id: str
    merchant_id: str
    operation_seq: int
    reason: str
    status: str
    created_at_ms: int


@dataclass(frozen=True)
class PositionView:
    position: CyclePosition
    acknowledged: bool
    open_disputes: int


@outcomes.result
@dataclass(frozen=True)
class CycleView:
    cycle_id: str
    currency: str
    minor_units: int
    period_start_ms: int
    cutoff_ms: int
    status: str
    operation_count: int
    bank_reference: str
    settled_at_ms: int | None
    positions: list[PositionView]
    counterparties: list[tuple[str, str, int, int]]
    disputes: list[DisputeView]


@dataclass(frozen=True)
class StatementSummary:
    cycle_id: str
    currency: str
    cutoff_ms: int
    net_micros: int
    settlement_minor: int
    acknowledged: bool
    open_disputes: int


@outcomes.result
@dataclass(frozen=True)
class StatementAcknowledgement:
    """A merchant's acknowledgement of its statement: the first one stands, whoever asks again."""

    cycle_id: str
    merchant_id: str
    key_id: str
    acknowledged_at_ms: int


@dataclass(frozen=True)
class SignedStatement:
    statement_json: bytes
    signature: bytes
    key_id: str


def _dispute(row: object) -> DisputeView:
    return DisputeView(
        dispute_id=row.dispute_id,  # type: ignore[attr-defined]
        cycle_id=row.cycle_id,  # type: ignore[attr-defined]
        merchant_id=row.merchant_id,  # type: ignore[attr-defined]
        operation_seq=int(row.operation_seq),  # type: ignore[attr-defined]
        reason=row.reason,  # type: ignore[attr-defined]
        status=row.status,  # type: ignore[attr-defined]
        created_at_ms=int(row.created_at_ms),  # type: ignore[attr-defined]
    )


def _open_disputes(conn: Connection, cycle_id: str) -> dict[str, int]:
    return {
        m: int(n)
        for m, n in conn.execute(
            select(disputes.c.merchant_id, func.count())
            .where(disputes.c.cycle_id == cycle_id, disputes.c.status == "open")
            .group_by(disputes.c.merchant_id)
        )
    }


def _counterparties(conn: Connection, cycle_id: str) -> list[tuple[str, str, int, int]]:
    """(merchant, partner, payable, receivable), from the signed statements that are their record."""
    out: list[tuple[str, str, int, int]] = []
    for merchant_id, body in conn.execute(
        select(statements.c.merchant_id, statements.c.statement_json).where(statements.c.cycle_id == cycle_id)
    ):
        partners = json.loads(bytes(body))["counterparties"]
        out += [(merchant_id, p, int(v["payable"]), int(v["receivable"])) for p, v in partners.items()]
    return sorted(out)


def cycle(conn: Connection, cycle_id: str) -> CycleView:
    row = conn.execute(select(cycles).where(cycles.c.cycle_id == cycle_id)).one_or_none()
    if row is None:
        raise errors.CycleNotFound(f"cycle {cycle_id} does not exist", cycle_id=cycle_id)
    acked = {
        m
        for (m,) in conn.execute(
            select(statements.c.merchant_id).where(
                statements.c.cycle_id == cycle_id, statements.c.ack_signature.is_not(None)
            )
        )
    }
    open_disputes = _open_disputes(conn, cycle_id)
    positions = [
        PositionView(
            CyclePosition(
                p.merchant_id,
                int(p.opening_carry_micros),
                int(p.payable_micros),
                int(p.receivable_micros),
                int(p.fees_micros),
                int(p.net_micros),
                int(p.settlement_minor),
                int(p.closing_carry_micros),
            ),
            p.merchant_id in acked,
            open_disputes.get(p.merchant_id, 0),
        )
        for p in conn.execute(
            select(cycle_positions)
            .where(cycle_positions.c.cycle_id == cycle_id)
            .order_by(cycle_positions.c.merchant_id)
        )
    ]
    counterparties = _counterparties(conn, cycle_id)
    dispute_rows = conn.execute(
        select(disputes)
        .where(disputes.c.cycle_id == cycle_id)
        .order_by(disputes.c.created_at_ms, disputes.c.dispute_id)
    )
    return CycleView(
        cycle_id=row.cycle_id,
        currency=row.currency,
        minor_units=MINOR_UNITS[row.currency],
        period_start_ms=int(row.period_start_ms),
        cutoff_ms=int(row.cutoff_ms),
        status=row.status,
        operation_count=int(row.operation_count),
        bank_reference=row.bank_reference or "",
        settled_at_ms=None if row.settled_at_ms is None else int(row.settled_at_ms),
        positions=positions,
        counterparties=counterparties,
        disputes=[_dispute(d) for d in dispute_rows],
    )


def cycle_ids(conn: Connection, currency: str | None, before: tuple[int, str] | None, limit: int) -> list[str]:
    """Newest cutoff first, keyset-paged by (cutoff, id)."""
    query = select(cycles.c.cycle_id)
    if currency:
        query = query.where(cycles.c.currency == currency)
    if before is not None:
        query = query.where(
            (cycles.c.cutoff_ms < before[0]) | and_(cycles.c.cutoff_ms == before[0], cycles.c.cycle_id < before[1])
        )
    return list(
        conn.execute(query.order_by(cycles.c.cutoff_ms.desc(), cycles.c.cycle_id.desc()).limit(limit)).scalars()
    )


def _statement_row(conn: Connection, merchant_id: str, cycle_id: str) -> object:
    row = conn.execute(
        select(statements).where(statements.c.cycle_id == cycle_id, statements.c.merchant_id == merchant_id)
    ).one_or_none()
    if row is None:
        raise errors.StatementNotFound(f"{merchant_id} has no statement in cycle {cycle_id}", cycle_id=cycle_id)
    return row


def cycle_window(conn: Connection, cycle_id: str) -> items_mod.Window:
    """What the closed cycle clears: its currency's stamps in its window, its operation-id bounds."""
    row = conn.execute(
        select(
            cycles.c.currency,
            cycles.c.window_start_ms,
            cycles.c.cutoff_ms,
            cycles.c.first_operation_seq,
            cycles.c.last_operation_seq,
        ).where(cycles.c.cycle_id == cycle_id)
    ).one_or_none()
    if row is None:
        raise errors.CycleNotFound(f"cycle {cycle_id} does not exist", cycle_id=cycle_id)
    first, last = row.first_operation_seq, row.last_operation_seq
    return items_mod.Window(
        row.currency,
        int(row.window_start_ms),
        int(row.cutoff_ms),
        None if first is None else int(first),
        None if last is None else int(last),
    )


def signed_statement(conn: Connection, merchant_id: str, cycle_id: str) -> SignedStatement:
    row = _statement_row(conn, merchant_id, cycle_id)
    return SignedStatement(bytes(row.statement_json), bytes(row.signature), row.key_id)  # type: ignore[attr-defined]


def statement_summaries(
    conn: Connection, merchant_id: str, before_cutoff: int | None, limit: int
) -> list[StatementSummary]:
    query = select(statements).where(statements.c.merchant_id == merchant_id)
    if before_cutoff is not None:
        query = query.where(statements.c.cutoff_ms < before_cutoff)
    rows = conn.execute(query.order_by(statements.c.cutoff_ms.desc()).limit(limit)).all()
    open_counts = {
        cycle_id: int(n)
        for cycle_id, n in conn.execute(
            select(disputes.c.cycle_id, func.count())
            .where(
                disputes.c.merchant_id == merchant_id,
                disputes.c.status == "open",
                disputes.c.cycle_id.in_([r.cycle_id for r in rows]),
            )
            .group_by(disputes.c.cycle_id)
        )
    }
    return [
        StatementSummary(
            r.cycle_id,
            r.currency,
            int(r.cutoff_ms),
            int(r.net_micros),
            int(r.settlement_minor),
            r.ack_signature is not None,
            open_counts.get(r.cycle_id, 0),
        )
        for r in rows
    ]


def statement_items(
    conn: Connection, merchant_id: str, cycle_id: str, after_seq: int | None, limit: int
) -> list[tuple[int, StatementItem]]:
    """The merchant's items of one statement in operation-id order, the order `items_sha256` hashes."""
    _statement_row(conn, merchant_id, cycle_id)
    item = items_mod.items(cycle_window(conn, cycle_id), merchant_id=merchant_id, after_seq=after_seq)
    rows = conn.execute(select(item).order_by(item.c.operation_seq).limit(limit))
    return [
        (
            int(r.operation_seq),
            StatementItem(format_operation_id(r.operation_seq), r.direction, r.counterparty, r.points, r.cash_micros),
        )
        for r in rows
    ]
