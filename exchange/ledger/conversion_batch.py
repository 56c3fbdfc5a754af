"""Many conversions in one transaction with set-based statements: the group-commit fast path.

`conversions.convert` runs one conversion in about thirty statements; run per request inside a
batch, that statement overhead (not the database) bounds the hub. Here a whole batch reads what
it needs in a few queries, takes its row locks in one sorted pass, decides every conversion in
memory — in order, each seeing the balances, positions and daily totals its predecessors left —
and writes the survivors with one statement per table. The outcome of each request is exactly
the one `convert` would give if the batch's requests ran one after another: the same checks in
the same order, the same refusals with the same reasons, the same postings and records.

Locks: member rows first, sorted (as the single path in exchange/ledger/conversions.py takes
them), then the shared clearing fence, and the merchants' position rows — the hot rows every
batch touches — only at the very end, sorted, just before the audit head and the commit (see
`_move_positions`). Batches of different hub processes take rows in one order, and a merchant's
position row is written once per batch, with the sum of its deltas (DESIGN §2, hot rows).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, text, tuple_

from exchange.domain import errors
from exchange.domain.conversion import ConversionAmounts, convert_amounts
from exchange.domain.models import ConversionRecord, RouteView
from exchange.domain.units import MAX_BALANCE_POINTS
from exchange.ledger import accounts, conversions, members, merchants, points, positions, routes
from exchange.store import bulk, fences
from exchange.store.engine import is_sqlite
from exchange.store.schema import conversions as conversions_table
from exchange.store.schema import members as members_table
from exchange.store.schema import merchant_positions, operations, point_values, postings
from exchange.store.schema import merchants as merchants_table


@dataclass(frozen=True)
class Request:
    """One conversion of a batch: who asked, under which request id, what, and at what time."""

    caller: str
    request_id: str
    order: conversions.ConvertOrder  # without a quote: quoted conversions run the single way
    now_ms: int


@dataclass(frozen=True)
class _Merchant:
    status: str
    currency: str
    net_debit_cap_micros: int
    issuance_account_id: int
    clearing_account_id: int


@dataclass
class _Member:
    account_id: int
    network_member_id: str
    points: int
    changed: bool = False


@dataclass
class _State:
    """What a batch read, and the effects of the conversions decided so far, in memory."""

    merchants: dict[str, _Merchant]
    routes: dict[tuple[str, str], RouteView]
    members: dict[tuple[str, str], _Member]
    links: dict[tuple[str, str], str]  # (network member, merchant) -> member_ref there
    values: dict[str, list[tuple[int, int]]]  # merchant -> [(effective_at_ms, value_micros)], newest first
    positions: dict[str, int] = field(default_factory=dict)
    position_deltas: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    used_today: dict[tuple[int, str, str, str], int] = field(default_factory=dict)  # (day, S, ref, D)
    fences: dict[str, int] = field(default_factory=dict)
    platform_accounts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Decided:
    request: Request
    pair: conversions.Pair
    amounts: ConversionAmounts
    stamped_ms: int


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
_MEMBERS = select(*_MEMBER_COLUMNS).where(
    tuple_(members_table.c.merchant_id, members_table.c.member_ref).in_(bindparam("keys", expanding=True))
)
_LINKED = select(*_MEMBER_COLUMNS).where(
    tuple_(members_table.c.network_member_id, members_table.c.merchant_id).in_(bindparam("keys", expanding=True))
)
_LOCK_MEMBERS = (
    select(members_table.c.merchant_id, members_table.c.member_ref, members_table.c.points)
    .where(tuple_(members_table.c.merchant_id, members_table.c.member_ref).in_(bindparam("keys", expanding=True)))
    .order_by(members_table.c.merchant_id, members_table.c.member_ref)
    .with_for_update()
)
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
_LAST_SEQ = select(func.coalesce(func.max(operations.c.operation_seq), 0))
_NEXT_SEQS = text("SELECT nextval(pg_get_serial_sequence('operations', 'operation_seq')) FROM generate_series(1, :n)")


def _read(conn: Connection, requests: list[Request], default_fee: int) -> _State:
    orders = [r.order for r in requests]
    merchant_ids = sorted({m for o in orders for m in (o.source, o.destination)})
    found = {
        row.merchant_id: _Merchant(
            str(row.status), str(row.currency), int(row.net_debit_cap_micros),
            int(row.issuance_account_id), int(row.clearing_account_id),
        )
        for row in conn.execute(_MERCHANTS, {"ids": merchant_ids})
    }  # fmt: skip
    pairs = [(o.source, o.destination) for o in orders if o.source != o.destination]
    state = _State(
        merchants=found,
        routes=routes.find_many(conn, pairs, default_fee) if pairs else {},
        members={},
        links={},
        values=_values(conn, [m for m in merchant_ids if m in found], requests),
    )
    _read_members(conn, state, orders)
    return state


def _read_members(conn: Connection, state: _State, orders: list[conversions.ConvertOrder]) -> None:
    """Source members, their linked accounts at the destinations, then every one locked in order."""

    def keep(rows: Iterable[Any]) -> None:
        for row in rows:
            state.members[(row.merchant_id, row.member_ref)] = _Member(
                int(row.account_id), str(row.network_member_id), int(row.points)
            )
            state.links[(str(row.network_member_id), row.merchant_id)] = row.member_ref

    keep(conn.execute(_MEMBERS, {"keys": sorted({(o.source, o.member_ref) for o in orders})}))
    wanted_links = {
        (member.network_member_id, o.destination)
        for o in orders
        if (member := state.members.get((o.source, o.member_ref))) is not None
    }
    if wanted_links:
        keep(conn.execute(_LINKED, {"keys": sorted(wanted_links)}))
    if state.members and not is_sqlite(conn.engine):  # SQLite's write lock is already the batch's
        for row in conn.execute(_LOCK_MEMBERS, {"keys": sorted(state.members)}):
            state.members[(row.merchant_id, row.member_ref)].points = int(row.points)


def _values(conn: Connection, merchant_ids: list[str], requests: list[Request]) -> dict[str, list[tuple[int, int]]]:
    """Each merchant's values that can be in force at some request's time, newest first."""
    if not merchant_ids:
        return {}
    nows = [r.now_ms for r in requests]
    values: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row in conn.execute(_VALUES, {"ids": merchant_ids, "earliest": min(nows), "latest": max(nows)}):
        values[row.merchant_id].append((int(row.effective_at_ms), int(row.value_micros)))
    return values


def _value_at(conn: Connection, state: _State, merchant_id: str, now_ms: int) -> int:
    for effective_at_ms, value_micros in state.values.get(merchant_id, ()):
        if effective_at_ms <= now_ms:
            return value_micros
    return merchants.value_at(conn, merchant_id, now_ms).value_micros  # before admission: the first value


def _read_positions_and_fences(conn: Connection, state: _State, decided: list[_Decided]) -> None:
    """Positions as last committed (not locked: see `_move_positions`), then each currency's fence."""
    merchant_ids = sorted({m for d in decided for m in (d.request.order.source, d.request.order.destination)})
    state.positions = {
        row.merchant_id: int(row.open_net_micros) for row in conn.execute(_POSITIONS, {"ids": merchant_ids})
    }
    for currency in sorted({d.pair.currency for d in decided}):
        state.fences[currency] = fences.hold(conn, currency)


def _used_today(conn: Connection, state: _State, decided: list[_Decided]) -> None:
    """Today's converted cash per (member, route) for the capped routes of the batch."""
    by_day: dict[int, set[tuple[str, str, str]]] = defaultdict(set)
    for d in decided:
        if d.pair.route.daily_member_cap_micros:
            key = (d.request.order.source, d.pair.src_member_ref, d.request.order.destination)
            by_day[conversions.day_start(d.request.now_ms)].add(key)
    for day, keys in by_day.items():
        for key in keys:
            state.used_today[(day, *key)] = 0
        for source, ref, destination, used in conn.execute(_USED_TODAY, {"keys": sorted(keys), "day_start": day}):
            state.used_today[(day, source, ref, destination)] = int(used)


def _pair(conn: Connection, state: _State, request: Request) -> tuple[conversions.Pair, ConversionAmounts]:
    """`conversions.check_pair`, `live_amounts` and the amount checks, on what the batch read."""
    order = request.order
    conversions.check_distinct(order.source, order.destination)
    source, destination = state.merchants.get(order.source), state.merchants.get(order.destination)
    source_currency = merchants.check_active(order.source, None if source is None else (source.status, source.currency))
    destination_currency = merchants.check_active(
        order.destination, None if destination is None else (destination.status, destination.currency)
    )
    conversions.check_merchants(order.source, order.destination, source_currency, destination_currency)
    route = routes.check_open(order.source, order.destination, state.routes.get((order.source, order.destination)))
    member = state.members.get((order.source, order.member_ref))
    if member is None:
        raise members.not_enrolled(order.source, order.member_ref)
    dst_member_ref = state.links.get((member.network_member_id, order.destination))
    if dst_member_ref is None:
        raise conversions.not_linked(order.member_ref, order.source, order.destination)
    pair = conversions.Pair(route, order.member_ref, dst_member_ref)
    amounts = convert_amounts(
        order.src_points,
        _value_at(conn, state, order.source, request.now_ms),
        _value_at(conn, state, order.destination, request.now_ms),
        route.fee_bps,
    )
    conversions.check_min_dst(order, amounts)
    conversions.check_route_limits(route, amounts.src_points)
    return pair, amounts


def _move_points(
    state: _State, order: conversions.ConvertOrder, pair: conversions.Pair, amounts: ConversionAmounts
) -> None:
    """Debit and credit the two members, checked in merchant-id order as `_move_member_points` does."""
    debtor = state.members[(order.source, pair.src_member_ref)]
    creditor = state.members[(order.destination, pair.dst_member_ref)]

    def debit() -> None:
        if debtor.points < amounts.src_points:
            raise points.insufficient(pair.src_member_ref, debtor.points, amounts.src_points)

    def credit() -> None:
        if creditor.points > MAX_BALANCE_POINTS - amounts.dst_points:
            raise points.over_ceiling(pair.dst_member_ref)

    for check in (debit, credit) if order.source <= order.destination else (credit, debit):
        check()
    debtor.points -= amounts.src_points
    creditor.points += amounts.dst_points
    debtor.changed = creditor.changed = True


def _unmove_points(
    state: _State, order: conversions.ConvertOrder, pair: conversions.Pair, amounts: ConversionAmounts
) -> None:
    state.members[(order.source, pair.src_member_ref)].points += amounts.src_points
    state.members[(order.destination, pair.dst_member_ref)].points -= amounts.dst_points


def _settle(state: _State, d: _Decided) -> None:
    """The daily cap and the net debit cap, then the position deltas; raises before changing anything."""
    order, amounts = d.request.order, d.amounts
    day_key = (conversions.day_start(d.request.now_ms), order.source, d.pair.src_member_ref, order.destination)
    if d.pair.route.daily_member_cap_micros:
        conversions.check_daily_cap_used(d.pair, state.used_today[day_key], amounts.src_cash)
    position = state.positions[order.source]
    cap = state.merchants[order.source].net_debit_cap_micros
    if position - amounts.src_cash < -cap:
        raise positions.cap_exceeded(order.source, position, cap, amounts.src_cash)
    state.positions[order.source] = position - amounts.src_cash
    state.positions[order.destination] += amounts.dst_cash
    state.position_deltas[order.source] -= amounts.src_cash
    state.position_deltas[order.destination] += amounts.dst_cash
    if d.pair.route.daily_member_cap_micros:
        state.used_today[day_key] += amounts.src_cash


def convert_many(
    conn: Connection, requests: list[Request], default_fee: int
) -> list[ConversionRecord | errors.DomainError]:
    """Every request's conversion record, or its refusal, as if they had run one after another."""
    if not requests:
        return []
    state = _read(conn, requests, default_fee)
    outcomes: list[_Decided | errors.DomainError] = []
    for request in requests:  # the checks before any balance moves
        try:
            pair, amounts = _pair(conn, state, request)
            outcomes.append(_Decided(request, pair, amounts, request.now_ms))
        except errors.DomainError as refusal:
            outcomes.append(refusal)
    passed = [o for o in outcomes if isinstance(o, _Decided)]
    if passed:
        _read_positions_and_fences(conn, state, passed)
        _used_today(conn, state, passed)
    for index, outcome in enumerate(outcomes):  # then balances, caps and positions, in order
        if not isinstance(outcome, _Decided):
            continue
        order = outcome.request.order
        try:
            _move_points(state, order, outcome.pair, outcome.amounts)
        except errors.DomainError as refusal:
            outcomes[index] = refusal
            continue
        try:
            _settle(state, outcome)
        except errors.DomainError as refusal:
            _unmove_points(state, order, outcome.pair, outcome.amounts)
            outcomes[index] = refusal
            continue
        stamped = max(outcome.request.now_ms, state.fences[outcome.pair.currency])
        outcomes[index] = _Decided(outcome.request, outcome.pair, outcome.amounts, stamped)
    return _write(conn, state, outcomes)


def _allocate(conn: Connection, count: int) -> list[int]:
    """Operation ids for the batch's conversions, in order."""
    if is_sqlite(conn.engine):  # one writer at a time: the next ids are ours
        last = int(conn.execute(_LAST_SEQ).scalar_one())
        return list(range(last + 1, last + 1 + count))
    return sorted(int(seq) for seq in conn.execute(_NEXT_SEQS, {"n": count}).scalars())


def _platform_account(conn: Connection, state: _State, currency: str) -> int:
    if currency not in state.platform_accounts:
        state.platform_accounts[currency] = accounts.get_or_create_account(
            conn, accounts.cash_asset(currency), "platform"
        )
    return state.platform_accounts[currency]


def _write(
    conn: Connection, state: _State, outcomes: list[_Decided | errors.DomainError]
) -> list[ConversionRecord | errors.DomainError]:
    decided = [o for o in outcomes if isinstance(o, _Decided)]
    if not decided:
        return [o for o in outcomes if isinstance(o, errors.DomainError)]
    seqs = iter(_allocate(conn, len(decided)))
    results: list[ConversionRecord | errors.DomainError] = []
    operation_rows: list[dict[str, Any]] = []
    posting_rows: list[dict[str, Any]] = []
    conversion_rows: list[dict[str, Any]] = []
    for outcome in outcomes:
        if isinstance(outcome, errors.DomainError):
            results.append(outcome)
            continue
        seq, order, pair = next(seqs), outcome.request.order, outcome.pair
        record = ConversionRecord(
            operation_seq=seq, source_merchant_id=order.source, destination_merchant_id=order.destination,
            src_member_ref=pair.src_member_ref, dst_member_ref=pair.dst_member_ref, currency=pair.currency,
            amounts=outcome.amounts, quote_id=None, status="completed", reversal_operation_seq=None,
            created_at_ms=outcome.stamped_ms,
        )  # fmt: skip
        operation_rows.append(
            {
                "operation_seq": seq, "kind": "convert", "caller": outcome.request.caller,
                "request_id": outcome.request.request_id, "merchant_id": order.source,
                "member_ref": pair.src_member_ref, "points": outcome.amounts.src_points, "memo": "",
                "counterparty_merchant_id": order.destination, "currency": pair.currency,
                "created_at_ms": outcome.stamped_ms,
            }
        )  # fmt: skip
        source, destination = state.merchants[order.source], state.merchants[order.destination]
        legs = conversions.posting_legs(
            record,
            (source.issuance_account_id, source.clearing_account_id),
            (destination.issuance_account_id, destination.clearing_account_id),
            (
                state.members[(order.source, pair.src_member_ref)].account_id,
                state.members[(order.destination, pair.dst_member_ref)].account_id,
            ),
            _platform_account(conn, state, pair.currency),
            reverse=False,
        )
        posting_rows.extend(
            {"operation_seq": seq, "asset": asset, "debit_account_id": debit,
             "credit_account_id": credit, "amount": amount}
            for asset, debit, credit, amount in legs
        )  # fmt: skip
        conversion_rows.append(conversions.row_of(record))
        results.append(record)
    bulk.insert_rows(conn, operations, operation_rows)
    bulk.insert_rows(conn, postings, posting_rows)
    bulk.insert_rows(conn, conversions_table, conversion_rows)
    _update_rows(conn, state)
    return results


def _update_rows(conn: Connection, state: _State) -> None:
    """Each changed member's new balance and each merchant's summed position delta, once per batch."""
    changed = [
        {"merchant_id": m, "member_ref": ref, "points": member.points}
        for (m, ref), member in sorted(state.members.items())
        if member.changed
    ]
    bulk.update_rows(conn, members_table, ("merchant_id", "member_ref"), changed)
    _move_positions(conn, state)


def _move_positions(conn: Connection, state: _State) -> None:
    """Each merchant's summed delta, taken under the row lock at the very end of the batch.

    The merchants' position rows are the network's hot rows: every batch touches most of them. So
    they are read without a lock, the batch is decided on those values, and the rows are locked
    (sorted) only now, just before the commit — held for two statements, not the whole batch. If
    a concurrent batch of another hub process moved a payer so far that this batch's net delta
    would now pass its net debit cap, nothing is written: `bulk.RowsMoved` sends the items one by
    one through the guarded single path. Otherwise the outcome is that of this batch running just
    before the other: every intermediate position was checked on the value it read, and the final
    one is checked here (deltas add up in either order).
    """
    moved = sorted((m, d) for m, d in state.position_deltas.items() if d)
    if not moved:
        return
    if not is_sqlite(conn.engine):  # SQLite: the batch's write lock made the read exact
        current = {
            row.merchant_id: int(row.open_net_micros)
            for row in conn.execute(_LOCK_POSITIONS, {"ids": [m for m, _d in moved]})
        }
        for merchant_id, delta in moved:
            if delta < 0 and current[merchant_id] + delta < -state.merchants[merchant_id].net_debit_cap_micros:
                raise bulk.RowsMoved(f"{merchant_id}'s position moved under this batch")
    rows = [{"merchant_id": m, "open_net_micros": d} for m, d in moved]
    bulk.update_rows(conn, merchant_positions, ("merchant_id",), rows, add=True)
