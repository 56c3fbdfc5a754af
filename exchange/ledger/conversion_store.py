"""Conversions in the database: load a batch's snapshot, let the one engine decide, write set-based.

The decisions are made by `exchange/domain/decider.py`; this module only reads what the orders
touch — merchants, routes, quotes, members and their links, point values, positions, today's
converted totals, the clearing fences — with the locks that make the read exact, and writes what
was accepted: one statement per table per batch, a member's balance and a merchant's position
written once with the sum of the batch's effects (DESIGN §2, hot rows). A `Convert` is a batch of
one; a `ConvertBatch`, or the conversions a writer batch gathers from many callers, are larger.

Locks, in one order everywhere (so two batches, a reversal and a clearing close never wait on each
other in a cycle): quote rows, member rows sorted by (merchant, member_ref), the currencies'
clearing fences (shared), and last the merchants' position rows, sorted. Position rows are the
network's hot rows, so a writer batch reads them unlocked and locks them only at its end (see
`_move_positions`); a request run on its own (`lock_positions=True`) locks them as it reads.
On SQLite the write transaction is the only writer, and its reads are exact without row locks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, literal, or_, select, tuple_, update

from exchange.domain import decider, errors
from exchange.domain.models import ConversionRecord, QuoteView
from exchange.domain.requests import MutationContext
from exchange.ledger import accounts, conversions, quotes, routes
from exchange.store import bulk, dialect, fences, mutation, outbox
from exchange.store.schema import accounts as accounts_table
from exchange.store.schema import conversions as conversions_table
from exchange.store.schema import members as members_table
from exchange.store.schema import merchant_positions, operations, point_values, postings
from exchange.store.schema import merchants as merchants_table
from exchange.store.schema import quotes as quotes_table


@dataclass(frozen=True)
class Request:
    """One conversion of a batch: who asked, under which request id, what, and at what time."""

    caller: str
    request_id: str
    order: decider.ConvertOrder
    now_ms: int


@dataclass
class _Accounts:
    """The ledger accounts the postings of the batch move between."""

    merchants: dict[str, tuple[int, int]]  # merchant -> (issuance, clearing)
    members: dict[tuple[str, str], int]  # (merchant, member_ref) -> account
    caps: dict[str, int]  # merchant -> net debit cap, micros
    platform: dict[str, int] = field(default_factory=dict)  # cash asset -> the platform's account
    seqs: list[int] = field(default_factory=list)  # operation ids reserved with the reads (PostgreSQL)


# Built once (hot path): building and cache-keying statements costs more than the database's work.
_MERCHANTS = select(
    merchants_table.c.merchant_id,
    merchants_table.c.status,
    merchants_table.c.currency,
    merchants_table.c.net_debit_cap_micros,
    merchants_table.c.issuance_account_id,
    merchants_table.c.clearing_account_id,
).where(merchants_table.c.merchant_id.in_(bindparam("ids", expanding=True)))
_MEMBER_COLUMNS = (
    members_table.c.merchant_id,
    members_table.c.member_ref,
    members_table.c.account_id,
    members_table.c.network_member_id,
    members_table.c.points,
)
_source_member = members_table.alias("source_member")
# The orders' source members and, in the same read, every account of those people at the orders'
# destinations (a superset of the links wanted: one query instead of two, and on PostgreSQL the
# same statement takes the row locks, sorted).
_MEMBER_ROWS = (
    select(*_MEMBER_COLUMNS)
    .where(
        or_(
            tuple_(members_table.c.merchant_id, members_table.c.member_ref).in_(bindparam("keys", expanding=True)),
            and_(
                members_table.c.merchant_id.in_(bindparam("destinations", expanding=True)),
                members_table.c.network_member_id.in_(
                    select(_source_member.c.network_member_id).where(
                        tuple_(_source_member.c.merchant_id, _source_member.c.member_ref).in_(
                            bindparam("sources", expanding=True)
                        )
                    )
                ),
            ),
        )
    )
    .order_by(members_table.c.merchant_id, members_table.c.member_ref)
)
_LOCK_MEMBER_ROWS = _MEMBER_ROWS.with_for_update(of=members_table)
_QUOTES = (
    select(quotes_table)
    .where(quotes_table.c.quote_id.in_(bindparam("ids", expanding=True)))
    .order_by(quotes_table.c.quote_id)
)
_LOCK_QUOTES = _QUOTES.with_for_update()
_older = point_values.alias("older")
_VALUES = (
    select(point_values.c.merchant_id, point_values.c.effective_at_ms, point_values.c.value_micros)
    .where(
        point_values.c.merchant_id.in_(bindparam("ids", expanding=True)),
        point_values.c.effective_at_ms <= bindparam("latest"),
        point_values.c.effective_at_ms
        >= select(func.coalesce(func.max(_older.c.effective_at_ms), 0))
        .where(_older.c.merchant_id == point_values.c.merchant_id, _older.c.effective_at_ms <= bindparam("earliest"))
        .scalar_subquery(),
    )
    .order_by(point_values.c.merchant_id, point_values.c.effective_at_ms.desc())
)
_FIRST_VALUES = (
    select(point_values.c.merchant_id, point_values.c.effective_at_ms, point_values.c.value_micros)
    .where(point_values.c.merchant_id.in_(bindparam("ids", expanding=True)))
    .order_by(point_values.c.merchant_id, point_values.c.effective_at_ms)
)
_POSITIONS = (
    select(merchant_positions.c.merchant_id, merchant_positions.c.open_net_micros)
    .where(merchant_positions.c.merchant_id.in_(bindparam("ids", expanding=True)))
    .order_by(merchant_positions.c.merchant_id)
)
_LOCK_POSITIONS = _POSITIONS.with_for_update()
_USED_TODAY = (
    select(
        conversions_table.c.source_merchant_id,
        conversions_table.c.src_member_ref,
        conversions_table.c.destination_merchant_id,
        func.sum(conversions_table.c.src_cash_micros),
    )
    .where(
        tuple_(
            conversions_table.c.source_merchant_id,
            conversions_table.c.src_member_ref,
            conversions_table.c.destination_merchant_id,
        ).in_(bindparam("keys", expanding=True)),
        conversions_table.c.created_at_ms >= bindparam("day_start"),
        conversions_table.c.status == "completed",
    )
    .group_by(
        conversions_table.c.source_merchant_id,
        conversions_table.c.src_member_ref,
        conversions_table.c.destination_merchant_id,
    )
)
# The platform's fee account of each currency the merchants settle in (made on first use).
_PLATFORM_ACCOUNTS = select(accounts_table.c.asset, accounts_table.c.account_id).where(
    accounts_table.c.kind == "platform",
    accounts_table.c.merchant_id.is_(None),
    accounts_table.c.member_ref.is_(None),
    accounts_table.c.asset.in_(
        select(literal("cash:") + merchants_table.c.currency).where(
            merchants_table.c.merchant_id.in_(bindparam("ids", expanding=True))
        )
    ),
)
_SPEND_QUOTE = (
    update(quotes_table)
    .where(quotes_table.c.quote_id == bindparam("q"), quotes_table.c.used_by_operation_seq.is_(None))
    .values(used_by_operation_seq=bindparam("seq"))
)


def _members(
    rows: Iterable[Any], found: _Accounts
) -> tuple[dict[tuple[str, str], decider.MemberFacts], dict[tuple[str, str], str]]:
    facts: dict[tuple[str, str], decider.MemberFacts] = {}
    links: dict[tuple[str, str], str] = {}
    for row in rows:
        facts[(row.merchant_id, row.member_ref)] = decider.MemberFacts(str(row.network_member_id), int(row.points))
        found.members[(row.merchant_id, row.member_ref)] = int(row.account_id)
        links[(str(row.network_member_id), row.merchant_id)] = row.member_ref
    return facts, links


def _values(rows: Iterable[Any]) -> dict[str, list[tuple[int, int]]]:
    values: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row in rows:
        values[row.merchant_id].append((int(row.effective_at_ms), int(row.value_micros)))
    return values


def _first_values(conn: Connection, values: dict[str, list[tuple[int, int]]], merchant_ids: Iterable[str]) -> None:
    """A merchant admitted after every order's time (a clock a little behind) gets its first value."""
    if missing := [m for m in merchant_ids if not values.get(m)]:
        for row in conn.execute(_FIRST_VALUES, {"ids": missing}):
            if not values[row.merchant_id]:
                values[row.merchant_id].append((int(row.effective_at_ms), int(row.value_micros)))


def _quote_facts(rows: Iterable[Any]) -> dict[str, decider.QuoteFacts]:
    return {
        row.quote_id: decider.QuoteFacts(
            source=row.source_merchant_id, destination=row.destination_merchant_id, member_ref=row.member_ref,
            src_points=int(row.src_points), src_value_micros=int(row.src_value_micros),
            dst_value_micros=int(row.dst_value_micros), fee_bps=int(row.fee_bps),
            expires_at_ms=int(row.expires_at_ms), used=row.used_by_operation_seq is not None,
        )
        for row in rows
    }  # fmt: skip


def _used_today(
    conn: Connection, timed: list[decider.TimedOrder], routes_found: dict[tuple[str, str], Any]
) -> dict[tuple[int, str, str, str], int]:
    """Today's converted cash per (member, route), for the orders on capped routes (few)."""
    by_day: dict[int, set[tuple[str, str, str]]] = defaultdict(set)
    for t in timed:
        route = routes_found.get((t.order.source, t.order.destination))
        if route is not None and route.daily_member_cap_micros:
            by_day[decider.day_start(t.now_ms)].add((t.order.source, t.order.member_ref, t.order.destination))
    used: dict[tuple[int, str, str, str], int] = {}
    for day, keys in by_day.items():
        for source, ref, destination, total in conn.execute(_USED_TODAY, {"keys": sorted(keys), "day_start": day}):
            used[(day, source, ref, destination)] = int(total)
    return used


def load(
    conn: Connection, timed: list[decider.TimedOrder], default_fee: int, *, for_quote: bool = False,
    lock_positions: bool = False,
) -> tuple[decider.Snapshot, _Accounts]:  # fmt: skip
    """The snapshot the orders are decided on, and the accounts their postings need.

    Its reads go out together (`dialect.read_all`: one round trip on PostgreSQL), in the order
    the locks must be taken: quote rows, member rows, the currencies' fences, positions.
    `for_quote`: only what a quote's checks read (no locks, positions or fences).
    """
    orders = [t.order for t in timed]
    merchant_ids = sorted({m for o in orders for m in (o.source, o.destination)})
    pairs = sorted({(o.source, o.destination) for o in orders if o.source != o.destination})
    quote_ids = sorted({o.quote_id for o in orders if o.quote_id}) if not for_quote else []
    sources = sorted({(o.source, o.member_ref) for o in orders})
    nows = [t.now_ms for t in timed]
    exact = dialect.writers_serialised(conn)  # SQLite: nothing to lock, the write lock is ours
    ids = {"ids": merchant_ids}
    reads: dict[str, dialect.Query] = {"merchants": (_MERCHANTS, ids)}
    if pairs:
        reads["routes"] = (routes.FIND_MANY, {"pairs": pairs})
    if quote_ids:
        reads["quotes"] = (_QUOTES if exact else _LOCK_QUOTES, {"ids": quote_ids})
    member_params = {"keys": sources, "sources": sources, "destinations": sorted({o.destination for o in orders})}
    reads["members"] = (_MEMBER_ROWS if exact or for_quote else _LOCK_MEMBER_ROWS, member_params)
    reads["values"] = (_VALUES, {"ids": merchant_ids, "earliest": min(nows), "latest": max(nows)})
    if not for_quote:
        if not exact:
            reads["hold"] = (fences.HOLD_FOR_MERCHANTS, ids)
        reads["fences"] = (fences.FENCES_FOR_MERCHANTS, ids)
        reads["positions"] = (_LOCK_POSITIONS if lock_positions and not exact else _POSITIONS, ids)
        reads["platform"] = (_PLATFORM_ACCOUNTS, ids)
        if (reserve := dialect.operation_seqs_query(conn, len(orders))) is not None:
            reads["seqs"] = reserve
    rows = dict(zip(reads, dialect.read_all(conn, list(reads.values())), strict=True))
    found = _Accounts({}, {}, {})
    merchant_facts: dict[str, decider.MerchantFacts] = {}
    for row in rows["merchants"]:
        merchant_facts[row.merchant_id] = decider.MerchantFacts(
            str(row.status), str(row.currency), int(row.net_debit_cap_micros)
        )
        found.merchants[row.merchant_id] = (int(row.issuance_account_id), int(row.clearing_account_id))
        found.caps[row.merchant_id] = int(row.net_debit_cap_micros)
    routes_found = {
        (r.source_merchant_id, r.destination_merchant_id): routes.view_of(r, default_fee)
        for r in rows.get("routes", ())
    }
    member_facts, links = _members(rows["members"], found)
    values = _values(rows["values"])
    _first_values(conn, values, merchant_facts)
    fence_at: dict[str, int] = {}
    positions: dict[str, int] = {}
    used_today: dict[tuple[int, str, str, str], int] = {}
    if not for_quote:
        fenced = {r.currency: int(r.fenced_before_ms) for r in rows["fences"]}
        fence_at = {c: fenced.get(c, 0) for c in sorted({f.currency for f in merchant_facts.values()})}
        positions = {r.merchant_id: int(r.open_net_micros) for r in rows["positions"]}
        found.platform = {r.asset: int(r.account_id) for r in rows["platform"]}
        found.seqs = sorted(int(r[0]) for r in rows.get("seqs", ()))
        used_today = _used_today(conn, timed, routes_found)
    snapshot = decider.Snapshot(
        merchants=merchant_facts, routes=routes_found, members=member_facts, links=links, values=values,
        quotes=_quote_facts(rows.get("quotes", ())), positions=positions, used_today=used_today, fences=fence_at,
    )  # fmt: skip
    return snapshot, found


def convert_many(
    conn: Connection, requests: list[Request], default_fee: int, *, lock_positions: bool = False
) -> list[ConversionRecord | errors.DomainError]:
    """Every request's conversion record, or its refusal, as if they had run one after another."""
    if not requests:
        return []
    timed = [decider.TimedOrder(r.order, r.now_ms) for r in requests]
    snapshot, found = load(conn, timed, default_fee, lock_positions=lock_positions)
    decided = decider.decide(snapshot, timed)
    records = _write(conn, requests, decided, found)
    if lock_positions or dialect.writers_serialised(conn):
        _add_positions(conn, decided.position_deltas)
    else:
        _move_positions(conn, decided.position_deltas, found.caps)
    return records


def quote(
    conn: Connection, *, order: decider.ConvertOrder, dst_points: int | None, now_ms: int, ttl_ms: int,
    default_fee: int,
) -> QuoteView:  # fmt: skip
    """A quote fixes the values and fee in force now: the conversion's own checks, then one row."""
    snapshot, _found = load(conn, [decider.TimedOrder(order, now_ms)], default_fee, for_quote=True)
    currency, amounts = decider.quote_amounts(snapshot, order, now_ms, dst_points=dst_points)
    return quotes.create(
        conn, source=order.source, destination=order.destination, member_ref=order.member_ref, currency=currency,
        amounts=amounts, now_ms=now_ms, ttl_ms=ttl_ms,
    )  # fmt: skip


def _platform_accounts(conn: Connection, currencies: set[str], found: _Accounts) -> dict[str, int]:
    platform = {}
    for currency in sorted(currencies):
        asset = accounts.cash_asset(currency)
        account = found.platform.get(asset)
        platform[currency] = account if account is not None else accounts.get_or_create_account(conn, asset, "platform")
    return platform


def _write(
    conn: Connection, requests: list[Request], decided: decider.Decided, found: _Accounts
) -> list[ConversionRecord | errors.DomainError]:
    """Operations, postings and conversion records of the accepted, spent quotes, new balances."""
    accepted = [o for o in decided.outcomes if isinstance(o, decider.Decision)]
    reserved = found.seqs[: len(accepted)] if len(found.seqs) >= len(accepted) else None
    seqs = iter(reserved if reserved is not None else dialect.allocate_operation_seqs(conn, len(accepted)))
    platform = _platform_accounts(conn, {d.currency for d in accepted}, found)
    results: list[ConversionRecord | errors.DomainError] = []
    operation_rows: list[dict[str, Any]] = []
    posting_rows: list[dict[str, Any]] = []
    conversion_rows: list[dict[str, Any]] = []
    for request, outcome in zip(requests, decided.outcomes, strict=True):
        if isinstance(outcome, errors.DomainError):
            results.append(outcome)
            continue
        seq = next(seqs)
        record = ConversionRecord(
            operation_seq=seq, source_merchant_id=outcome.source, destination_merchant_id=outcome.destination,
            src_member_ref=outcome.src_member_ref, dst_member_ref=outcome.dst_member_ref, currency=outcome.currency,
            amounts=outcome.amounts, quote_id=outcome.quote_id, status="completed", reversal_operation_seq=None,
            created_at_ms=outcome.stamped_ms,
        )  # fmt: skip
        operation_rows.append(
            {
                "operation_seq": seq, "kind": "convert", "caller": request.caller, "request_id": request.request_id,
                "merchant_id": outcome.source, "member_ref": outcome.src_member_ref,
                "points": outcome.amounts.src_points, "memo": "", "counterparty_merchant_id": outcome.destination,
                "currency": outcome.currency, "created_at_ms": outcome.stamped_ms,
            }
        )  # fmt: skip
        legs = conversions.posting_legs(
            record,
            found.merchants[outcome.source],
            found.merchants[outcome.destination],
            (
                found.members[(outcome.source, outcome.src_member_ref)],
                found.members[(outcome.destination, outcome.dst_member_ref)],
            ),
            platform[outcome.currency],
            reverse=False,
        )
        posting_rows.extend(
            {"operation_seq": seq, "asset": asset, "debit_account_id": debit, "credit_account_id": credit,
             "amount": amount}
            for asset, debit, credit, amount in legs
        )  # fmt: skip
        conversion_rows.append(conversions.row_of(record))
        results.append(record)
    if not accepted:
        return results
    bulk.insert_rows(conn, operations, operation_rows)
    bulk.insert_rows(conn, postings, posting_rows)
    bulk.insert_rows(conn, conversions_table, conversion_rows)
    for result in results:
        if isinstance(result, ConversionRecord) and result.quote_id is not None:
            # Locked when read (or the only writer): the guard can only fail on a bug.
            spent = conn.execute(_SPEND_QUOTE, {"q": result.quote_id, "seq": result.operation_seq}).rowcount
            assert spent == 1, f"quote {result.quote_id} was spent under its row lock"
    balances = [
        {"merchant_id": m, "member_ref": ref, "points": points} for (m, ref), points in sorted(decided.balances.items())
    ]
    bulk.update_rows(conn, members_table, ("merchant_id", "member_ref"), balances)
    return results


def _add_positions(conn: Connection, deltas: dict[str, int]) -> None:
    rows = [{"merchant_id": m, "open_net_micros": d} for m, d in sorted(deltas.items()) if d]
    if rows:
        bulk.update_rows(conn, merchant_positions, ("merchant_id",), rows, add=True)


def _move_positions(conn: Connection, deltas: dict[str, int], caps: dict[str, int]) -> None:
    """Each merchant's summed delta, taken under the row lock at the very end of the batch.

    The merchants' position rows are the network's hot rows: every batch touches most of them. So
    they are read without a lock, the batch is decided on those values, and the rows are locked
    (sorted) only now, just before the commit — held for two statements, not the whole batch. If
    a concurrent batch of another hub process moved a payer so far that this batch's net delta
    would now pass its net debit cap, nothing is written: `bulk.RowsMoved` sends the items one by
    one, each locking the positions as it reads them. Otherwise the outcome is that of this batch
    running just before the other: every intermediate position was checked on the value it read,
    and the final one is checked here (deltas add up in either order).
    """
    moved = sorted((m, d) for m, d in deltas.items() if d)
    if not moved:
        return
    current = {
        row.merchant_id: int(row.open_net_micros)
        for row in conn.execute(_LOCK_POSITIONS, {"ids": [m for m, _d in moved]})
    }
    for merchant_id, delta in moved:
        if delta < 0 and current[merchant_id] + delta < -caps[merchant_id]:
            raise bulk.RowsMoved(f"{merchant_id}'s position moved under this batch")
    _add_positions(conn, deltas)


def _request(ctx: MutationContext, order: decider.ConvertOrder) -> Request:
    return Request(ctx.caller, ctx.request_id, order, ctx.now_ms)


def convert_together(
    conn: Connection, items: list[tuple[MutationContext, tuple[decider.ConvertOrder, int]]]
) -> list[mutation.Effected]:
    """The conversions of one writer batch, decided and written together; each with its events."""
    default_fees = {fee for _ctx, (_order, fee) in items}
    if len(default_fees) != 1:
        raise AssertionError("one hub's writer sees one default fee")
    requests = [_request(ctx, order) for ctx, (order, _fee) in items]
    return [
        (outcome, [] if isinstance(outcome, errors.DomainError) else conversions.events_of(outcome))
        for outcome in convert_many(conn, requests, default_fees.pop())
    ]


# The writer's bulk handler for conversions: built once, the writer groups items by its identity.
CONVERT_TOGETHER = mutation.together(convert_together)


def convert_alone(
    conn: Connection, *, ctx: MutationContext, order: decider.ConvertOrder, default_fee: int
) -> ConversionRecord:
    """A batch of one that locks the positions it reads: the way after a conflict."""
    (outcome,) = convert_many(conn, [_request(ctx, order)], default_fee, lock_positions=True)
    if isinstance(outcome, errors.DomainError):
        raise outcome
    for event in conversions.events_of(outcome):
        outbox.emit(conn, event)
    return outcome
