"""Closing a clearing cycle (DESIGN §5): exactly once, all in one transaction.

Everything a cycle is — which operations it holds, its per-merchant rows, counterparty
breakdowns, signed statements and the announcements of them — commits together or not at all, so
a process killed at any point leaves either nothing or a whole cycle, and closing again completes
it. Cycle ids derive from (currency, cutoff): closing the same cutoff twice finds the same cycle.
Several hubs on one PostgreSQL serialise on a transaction-scoped advisory lock per currency; on
SQLite the database's single writer does the same.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections import defaultdict
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, bindparam, func, insert, select, text, update

from clearing import items as items_mod
from clearing import netting
from clearing.statement import ItemsDigest, StatementFacts, StatementItem, rfc3339, sign, statement_json
from exchange.domain import errors
from exchange.domain.units import MINOR_UNITS, format_operation_id
from exchange.store import outbox
from exchange.store.engine import is_sqlite
from exchange.store.schema import (
    cycle_counterparties,
    cycle_positions,
    cycles,
    merchant_positions,
    operations,
    statements,
)

# Fault injection for the crash tests: the process kills itself (SIGKILL) at the named stage.
CRASH_ENV = "POINTSX_FAULT_CLEARING_CRASH_AT"
STAGES = ("assigned", "aggregated", "positions", "statements")
STREAM_BATCH = 10_000


def _stage(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def cycle_id_for(currency: str, cutoff_ms: int) -> str:
    stamp = rfc3339(cutoff_ms).replace("-", "").replace(":", "")
    return f"{currency}-{stamp}"


@dataclass(frozen=True)
class Signing:
    network: str
    hub_key: Ed25519PrivateKey
    hub_key_id: str


def _lock(conn: Connection, currency: str) -> None:
    if not is_sqlite(conn.engine):
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"pointsx-clearing:{currency}"})


def close_cycle(conn: Connection, *, currency: str, cutoff_ms: int, now_ms: int, signing: Signing) -> str:
    """Close the cycle of `currency` at `cutoff_ms` (or find it, if closed before); returns its id."""
    if currency not in MINOR_UNITS:
        raise errors.UnsupportedCurrency(f"{currency} is not a currency this network clears")
    if cutoff_ms > now_ms:
        raise errors.CutoffInFuture(
            "a cutoff lies in the past: operations before it must all be recorded", cutoff=rfc3339(cutoff_ms)
        )
    _lock(conn, currency)
    cycle_id = cycle_id_for(currency, cutoff_ms)
    if conn.execute(select(cycles.c.cycle_id).where(cycles.c.cycle_id == cycle_id)).first() is not None:
        return cycle_id
    latest = conn.execute(
        select(cycles.c.cycle_id, cycles.c.cutoff_ms)
        .where(cycles.c.currency == currency)
        .order_by(cycles.c.cutoff_ms.desc())
        .limit(1)
    ).one_or_none()
    if latest is not None and latest.cutoff_ms >= cutoff_ms:
        raise errors.CutoffBeforeLastCycle(
            f"cycle {latest.cycle_id} already closed at {rfc3339(latest.cutoff_ms)}; a new cutoff must be later",
            last_cycle_id=latest.cycle_id,
        )

    assigned = conn.execute(
        update(operations)
        .where(
            operations.c.currency == currency,
            operations.c.cycle_id.is_(None),
            operations.c.created_at_ms < cutoff_ms,
        )
        .values(cycle_id=cycle_id)
    ).rowcount
    _stage("assigned")

    if latest is not None:
        period_start = int(latest.cutoff_ms)
    else:
        first = conn.execute(
            select(func.min(operations.c.created_at_ms)).where(operations.c.cycle_id == cycle_id)
        ).scalar_one()
        period_start = int(first) if first is not None else cutoff_ms

    pairs: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for merchant_id, counterparty, payable, receivable in conn.execute(items_mod.counterparty_totals(cycle_id)):
        pairs[merchant_id][counterparty] = (int(payable), int(receivable))
    fees = int(conn.execute(items_mod.platform_fees(cycle_id)).scalar_one())
    carries: dict[str, int] = {}
    if latest is not None:
        carries = {
            m: int(c)
            for m, c in conn.execute(
                select(cycle_positions.c.merchant_id, cycle_positions.c.closing_carry_micros).where(
                    cycle_positions.c.cycle_id == latest.cycle_id, cycle_positions.c.closing_carry_micros != 0
                )
            )
        }
    merchant_ids = sorted((set(pairs) | set(carries)) - {netting.PLATFORM})
    rows = netting.net_cycle(
        currency,
        [
            netting.PositionInput(
                m,
                carries.get(m, 0),
                sum(p for p, _r in pairs[m].values()),
                sum(r for _p, r in pairs[m].values()),
            )
            for m in merchant_ids
        ],
        fees,
        carries.get(netting.PLATFORM, 0),
    )
    conn.execute(
        insert(cycles).values(
            cycle_id=cycle_id,
            currency=currency,
            period_start_ms=period_start,
            cutoff_ms=cutoff_ms,
            status="closed",
            operation_count=assigned,
            closed_at_ms=now_ms,
        )
    )
    conn.execute(
        insert(cycle_positions),
        [
            {
                "cycle_id": cycle_id,
                "merchant_id": r.merchant_id,
                "opening_carry_micros": r.opening_carry,
                "payable_micros": r.payable,
                "receivable_micros": r.receivable,
                "fees_micros": r.fees,
                "net_micros": r.net,
                "settlement_minor": r.settlement_minor,
                "closing_carry_micros": r.closing_carry,
            }
            for r in rows
        ],
    )
    breakdown = [
        {"cycle_id": cycle_id, "merchant_id": m, "counterparty_id": cp, "payable_micros": p, "receivable_micros": r}
        for m in sorted(pairs)
        for cp, (p, r) in sorted(pairs[m].items())
    ]
    if breakdown:
        conn.execute(insert(cycle_counterparties), breakdown)
    _stage("aggregated")

    # The closed amounts leave the merchants' open positions (net debit cap, DESIGN §4).
    moved = [{"m": r.merchant_id, "delta": r.receivable - r.payable} for r in rows[:-1] if r.receivable or r.payable]
    if moved:
        conn.execute(
            update(merchant_positions)
            .where(merchant_positions.c.merchant_id == bindparam("m"))
            .values(open_net_micros=merchant_positions.c.open_net_micros - bindparam("delta")),
            moved,
        )
    _stage("positions")

    _write_statements(conn, cycle_id, currency, period_start, cutoff_ms, now_ms, rows[:-1], pairs, signing)
    _stage("statements")
    return cycle_id


def _digests(conn: Connection, cycle_id: str) -> dict[str, ItemsDigest]:
    """Each merchant's items hashed in operation order, streamed: memory stays flat however many."""
    item = items_mod.items(cycle_id)
    digests: dict[str, ItemsDigest] = defaultdict(ItemsDigest)
    result = conn.execute(
        select(item).order_by(item.c.merchant_id, item.c.operation_seq).execution_options(yield_per=STREAM_BATCH)
    )
    for row in result:
        digests[row.merchant_id].add(
            StatementItem(
                format_operation_id(row.operation_seq), row.direction, row.counterparty, row.points, row.cash_micros
            )
        )
    return digests


def _write_statements(
    conn: Connection,
    cycle_id: str,
    currency: str,
    period_start: int,
    cutoff_ms: int,
    now_ms: int,
    rows: list[netting.CyclePosition],
    pairs: dict[str, dict[str, tuple[int, int]]],
    signing: Signing,
) -> None:
    digests = _digests(conn, cycle_id)
    step = netting.micros_per_minor(currency)
    for row in rows:
        previous = conn.execute(
            select(statements.c.statement_sha256)
            .where(statements.c.merchant_id == row.merchant_id)
            .order_by(statements.c.cutoff_ms.desc())
            .limit(1)
        ).scalar_one_or_none()
        digest = digests.get(row.merchant_id) or ItemsDigest()
        body = statement_json(
            StatementFacts(
                network=signing.network,
                cycle_id=cycle_id,
                currency=currency,
                minor_units=MINOR_UNITS[currency],
                period_start_ms=period_start,
                cutoff_ms=cutoff_ms,
                merchant=row.merchant_id,
                opening_carry=row.opening_carry,
                payable=row.payable,
                receivable=row.receivable,
                net=row.net,
                settlement_micros=row.settlement_minor * step,
                settlement_minor=row.settlement_minor,
                closing_carry=row.closing_carry,
                counterparties=dict(sorted(pairs.get(row.merchant_id, {}).items())),
                item_count=digest.count,
                items_sha256=digest.hexdigest(),
                hub_key_id=signing.hub_key_id,
                previous_sha256=previous or "",
            )
        )
        conn.execute(
            insert(statements).values(
                cycle_id=cycle_id,
                merchant_id=row.merchant_id,
                currency=currency,
                cutoff_ms=cutoff_ms,
                statement_json=body,
                statement_sha256=hashlib.sha256(body).hexdigest(),
                signature=sign(signing.hub_key, body),
                key_id=signing.hub_key_id,
                item_count=digest.count,
                net_micros=row.net,
                settlement_minor=row.settlement_minor,
                created_at_ms=now_ms,
            )
        )
        outbox.emit(
            conn, outbox.StagedEvent(row.merchant_id, outbox.STATEMENT_READY, row.merchant_id, cycle_id=cycle_id)
        )
