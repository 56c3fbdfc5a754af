"""Closing a clearing cycle (DESIGN §5): exactly once, all in one transaction.

A cycle holds the operations of its currency stamped in its window, [previous cutoff, cutoff):
closing first raises the currency's clearing fence to the cutoff (exchange/store/fences.py), so
nothing more can land in the window, then aggregates it — no operation row is rewritten.
Everything a cycle is — its per-merchant rows, counterparty breakdowns, signed statements and the
announcements of them — commits together or not at all, so a process killed at any point leaves
either nothing (at most a raised fence) or a whole cycle, and closing again completes it.
Cycle ids derive from (currency, cutoff): closing the same cutoff twice finds the same cycle.
The scheduler's close (`close_scheduled_all`) is one idempotent mutation per currency, keyed by the cycle.
Several hubs on one PostgreSQL serialise on a transaction-scoped advisory lock per currency; on
SQLite the database's single writer does the same.
"""

from __future__ import annotations

import hashlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, groupby, islice
from operator import itemgetter
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, bindparam, distinct, func, insert, select, update

from clearing import items as items_mod
from clearing import netting
from clearing.digests import NO_ITEMS, MerchantItems, merchant_items
from clearing.statement import StatementFacts, rfc3339, sign, statement_json
from exchange.domain import errors, outcomes
from exchange.domain.units import MINOR_UNITS
from exchange.store import dialect, fences, outbox
from exchange.store.engine import read_transaction
from exchange.store.mutation import MutationContext, run_mutation
from exchange.store.schema import (
    cycle_positions,
    cycles,
    merchant_positions,
    merchants,
    statements,
)
from exchange.store.streaming import stream_rows

_SUMMER = ThreadPoolExecutor(2, thread_name_prefix="clearing-items")
AGGREGATE_WORK_MEM = "64MB"  # PostgreSQL, inside the closing transaction only

# Fault injection for the crash tests: the process kills itself (SIGKILL) at the named stage.
CRASH_ENV = "POINTSX_FAULT_CLEARING_CRASH_AT"
STAGES = ("fenced", "aggregated", "positions", "statements")
STATEMENT_BATCH = 100
# Who closes on schedule, and as which call: its idempotency key derives from the cycle (close_scheduled).
SCHEDULER_CALLER = "scheduler"
CLOSE_METHOD = "/pointsx.v1.OperatorService/CloseCycle"


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
    dialect.advisory_lock(conn, f"pointsx-clearing:{currency}")


def _items_apart(engine: Engine, window: items_mod.Window) -> dict[str, MerchantItems]:
    with read_transaction(engine) as conn:
        return merchant_items(conn, window)


def _fence(conn: Connection, currency: str, cutoff_ms: int) -> None:
    """Raise the currency's clearing fence to the cutoff, committed before the window is read.

    PostgreSQL: in a transaction of its own, so conversions wait only for that instant, not for the
    whole close (a crash after it leaves a fence and no cycle; the rerun closes the same window).
    SQLite: inside the closing transaction — there is one writer, nothing can slip in between.
    """
    dialect.commit_ahead(conn, lambda fence_conn: fences.raise_fence(fence_conn, currency, cutoff_ms))


def close_cycle(conn: Connection, *, currency: str, cutoff_ms: int, now_ms: int, signing: Signing) -> str:
    """Close the cycle of `currency` at `cutoff_ms` (or find it, if closed before); returns its id."""
    if currency not in MINOR_UNITS:
        raise errors.UnsupportedCurrency(f"{currency} is not a currency this network clears")
    if cutoff_ms > now_ms:
        raise errors.CutoffInFuture(
            f"cutoff {rfc3339(cutoff_ms)} is in the future: a cycle closes only over time that has passed",
            cutoff=rfc3339(cutoff_ms),
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
    _fence(conn, currency, cutoff_ms)
    _stage("fenced")

    window, count, fees, period_start = _window(conn, currency, None if latest is None else int(latest.cutoff_ms),
                                                cutoff_ms)  # fmt: skip
    # The per-pair aggregate of a big cycle hashes in memory instead of spilling to disk.
    dialect.set_aggregate_memory(conn, AGGREGATE_WORK_MEM)
    # Fenced, the window is frozen: its items are hashed and summed on a connection of their own
    # while this one has the database aggregate them (GROUP BY), per merchant and per pair, so the
    # two overlap on two cores — and the two sums are checked against each other.
    summing = _SUMMER.submit(_items_apart, conn.engine, window)
    totals = {m: (int(p), int(r)) for m, p, r in conn.execute(items_mod.merchant_totals(window))}
    breakdowns = _counterparties_by_merchant(conn, window)
    first = next(breakdowns, None)  # the per-pair aggregate runs now
    conn.execute(
        insert(cycles).values(
            cycle_id=cycle_id,
            currency=currency,
            period_start_ms=period_start,
            cutoff_ms=cutoff_ms,
            window_start_ms=window.start_ms,
            first_operation_seq=window.first_seq,
            last_operation_seq=window.last_seq,
            status="closed",
            operation_count=count,
            closed_at_ms=now_ms,
        )
    )
    merchant_items = summing.result()
    # Two independent sums of the same items must agree: the database's GROUP BY, the hashing pass's.
    summed = {m: (i.payable, i.receivable) for m, i in merchant_items.items()}
    if summed != totals:
        raise AssertionError(f"cycle {cycle_id}: item sums disagree with the database's totals")
    rows = _net(conn, currency, None if latest is None else latest.cycle_id, merchant_items, fees)
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

    signed = _statements(
        cycle_id, window, period_start, now_ms, rows[:-1], signing, merchant_items,
        chain([first] if first else [], breakdowns), _previous_hashes(conn, currency, cutoff_ms),
    )  # fmt: skip
    while batch := list(islice(signed, STATEMENT_BATCH)):  # bounded memory however many merchants
        conn.execute(insert(statements), batch)
        for row in batch:
            merchant = str(row["merchant_id"])
            outbox.emit(conn, outbox.StagedEvent(merchant, outbox.STATEMENT_READY, merchant, cycle_id=cycle_id))
    _stage("statements")
    return cycle_id


def currencies_in_use(conn: Connection) -> list[str]:
    return sorted(conn.execute(select(distinct(merchants.c.currency))).scalars())


def close_scheduled(engine: Engine, signing: Signing, currency: str, cutoff_ms: int, now_ms: int) -> str:
    """Close one currency's cycle as the scheduler: idempotent by a key derived from the cycle."""
    cycle_id = cycle_id_for(currency, cutoff_ms)
    digest = hashlib.sha256(f"{CLOSE_METHOD}\n{currency}\n{cutoff_ms}".encode()).hexdigest()
    ctx = MutationContext(
        caller=SCHEDULER_CALLER,
        key_id=signing.hub_key_id,
        signature="",
        method=CLOSE_METHOD,
        request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"pointsx:{signing.network}:{cycle_id}")),
        content_sha256=digest,
        raw_sha256=digest,
        now_ms=now_ms,
    )

    def effect(conn: Connection) -> str:
        return close_cycle(conn, currency=currency, cutoff_ms=cutoff_ms, now_ms=now_ms, signing=signing)

    closed = run_mutation(engine, ctx, effect)
    # A close recorded before outcomes were domain results replays the cycle id's bytes.
    return closed.raw.decode() if isinstance(closed, outcomes.LegacyReply) else str(closed)


def close_scheduled_all(engine: Engine, signing: Signing, cutoff_ms: int, *, now_ms: Callable[[], int]) -> list[str]:
    """Close every currency's cycle at `cutoff_ms` as the scheduler, each stamped `now_ms()`; the cycle ids."""
    with engine.connect() as conn:
        currencies = currencies_in_use(conn)
    return [close_scheduled(engine, signing, currency, cutoff_ms, now_ms()) for currency in currencies]


def _window(
    conn: Connection, currency: str, previous_cutoff_ms: int | None, cutoff_ms: int
) -> tuple[items_mod.Window, int, int, int]:
    """(the window with its id bounds, its operation count, the platform's fees, the period start)."""
    start = previous_cutoff_ms or 0
    count, first_seq, last_seq, first_stamp, fees = conn.execute(
        items_mod.window_facts(items_mod.Window(currency, start, cutoff_ms))
    ).one()
    window = items_mod.Window(
        currency, start, cutoff_ms, None if first_seq is None else int(first_seq),
        None if last_seq is None else int(last_seq),
    )  # fmt: skip
    # The first cycle's period starts at its first operation; later ones where the last one ended.
    if previous_cutoff_ms is not None:
        period_start = previous_cutoff_ms
    else:
        period_start = cutoff_ms if first_stamp is None else int(first_stamp)
    return window, int(count), int(fees), period_start


def _net(
    conn: Connection, currency: str, previous_cycle: str | None, merchant_items: dict[str, MerchantItems], fees: int
) -> list[netting.CyclePosition]:
    """The cycle's rows: every merchant with items or a carry, in merchant order, then the platform."""
    carries: dict[str, int] = {}
    if previous_cycle is not None:
        carries = {
            m: int(c)
            for m, c in conn.execute(
                select(cycle_positions.c.merchant_id, cycle_positions.c.closing_carry_micros).where(
                    cycle_positions.c.cycle_id == previous_cycle, cycle_positions.c.closing_carry_micros != 0
                )
            )
        }
    merchant_ids = sorted((set(merchant_items) | set(carries)) - {netting.PLATFORM})
    inputs = []
    for m in merchant_ids:
        summed = merchant_items.get(m, NO_ITEMS)
        inputs.append(netting.PositionInput(m, carries.get(m, 0), summed.payable, summed.receivable))
    return netting.net_cycle(currency, inputs, fees, carries.get(netting.PLATFORM, 0))


def _previous_hashes(conn: Connection, currency: str, cutoff_ms: int) -> dict[str, str]:
    """Each merchant's latest earlier statement hash, in one query: the chain's previous link."""
    latest = (
        select(statements.c.merchant_id, func.max(statements.c.cutoff_ms).label("cutoff_ms"))
        .where(statements.c.currency == currency, statements.c.cutoff_ms < cutoff_ms)
        .group_by(statements.c.merchant_id)
        .subquery()
    )
    return {
        m: h
        for m, h in conn.execute(
            select(statements.c.merchant_id, statements.c.statement_sha256).join(
                latest,
                (statements.c.merchant_id == latest.c.merchant_id) & (statements.c.cutoff_ms == latest.c.cutoff_ms),
            )
        )
    }


def _side_totals(conn: Connection, window: items_mod.Window, side: str) -> Iterator[tuple[Any, ...]]:
    """One side's (merchant, partner, payable, receivable) groups, streamed in merchant byte order."""
    totals = items_mod.counterparty_totals(window, side).subquery()
    # Byte order, as Python sorts the position rows it walks beside these (not the database's locale).
    return stream_rows(
        conn,
        select(totals.c.merchant_id, totals.c.counterparty, totals.c.payable, totals.c.receivable).order_by(
            dialect.bytewise(conn, totals.c.merchant_id), dialect.bytewise(conn, totals.c.counterparty)
        ),
    )


def _counterparties_by_merchant(
    conn: Connection, window: items_mod.Window
) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(merchant, {partner: (payable, receivable)}) in merchant order, streamed one merchant at a time.

    The source side's groups and the destination side's arrive as two streams in merchant order
    and are added up per merchant, so each conversion is aggregated once, never both ways round.
    The breakdown is kept only inside the signed statements: one row per pair of merchants would be
    a million-row insert for a big network's cycle, and a second copy that could drift.
    """
    sides = [groupby(_side_totals(conn, window, side), key=itemgetter(0)) for side in items_mod.SIDES]
    heads = [next(side, None) for side in sides]
    while any(head is not None for head in heads):
        merchant_id = min(head[0] for head in heads if head is not None)
        partners: dict[str, tuple[int, int]] = {}
        for n, head in enumerate(heads):
            if head is None or head[0] != merchant_id:
                continue
            for _m, counterparty, payable, receivable in head[1]:
                before = partners.get(counterparty, (0, 0))
                partners[counterparty] = (before[0] + int(payable), before[1] + int(receivable))
            heads[n] = next(sides[n], None)
        yield merchant_id, partners


def _statements(
    cycle_id: str,
    window: items_mod.Window,
    period_start: int,
    now_ms: int,
    rows: list[netting.CyclePosition],
    signing: Signing,
    merchant_items: dict[str, MerchantItems],
    breakdowns: Iterator[tuple[str, dict[str, tuple[int, int]]]],
    previous: dict[str, str],
) -> Iterator[dict[str, object]]:
    """One signed statement row per merchant row, walking the breakdowns beside them in merchant order."""
    currency, cutoff_ms = window.currency, window.cutoff_ms
    step = netting.micros_per_minor(currency)
    pending_breakdown = next(breakdowns, None)
    for row in rows:
        counterparties: dict[str, tuple[int, int]] = {}
        if pending_breakdown is not None and pending_breakdown[0] == row.merchant_id:
            counterparties = pending_breakdown[1]
            pending_breakdown = next(breakdowns, None)
        summed = merchant_items.get(row.merchant_id, NO_ITEMS)
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
                counterparties=counterparties,
                item_count=summed.count,
                items_sha256=summed.items_sha256,
                hub_key_id=signing.hub_key_id,
                previous_sha256=previous.get(row.merchant_id, ""),
            )
        )
        yield {
            "cycle_id": cycle_id,
            "merchant_id": row.merchant_id,
            "currency": currency,
            "cutoff_ms": cutoff_ms,
            "statement_json": body,
            "statement_sha256": hashlib.sha256(body).hexdigest(),
            "signature": sign(signing.hub_key, body),
            "key_id": signing.hub_key_id,
            "item_count": summed.count,
            "net_micros": row.net,
            "settlement_minor": row.settlement_minor,
            "created_at_ms": now_ms,
        }
    if pending_breakdown is not None:
        raise AssertionError(f"counterparty rows for {pending_breakdown[0]}, who has no position row")
