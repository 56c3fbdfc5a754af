"""Routes S -> D (DESIGN §4): opened by S, accepted by D, terms and closure set by the operator.

A route is one row per ordered pair, created by whichever side or the operator acts first, so
the two merchants can agree in either order and the operator can set terms before either has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, insert, literal, or_, select, tuple_, update

from exchange.domain import errors
from exchange.domain.conversion import check_fee_bps
from exchange.domain.models import RouteView
from exchange.domain.units import MAX_CAP_MICROS, MAX_POINTS
from exchange.ledger import merchants as merchants_mod
from exchange.store import outbox
from exchange.store.schema import merchants, routes

OUTBOUND, INBOUND = "outbound", "inbound"


def _pair_currency(conn: Connection, source: str, destination: str) -> str:
    if source == destination:
        raise errors.SameMerchant("a route joins two different merchants", merchant_id=source)
    _status, source_currency = merchants_mod.require(conn, source)
    _status, destination_currency = merchants_mod.require(conn, destination)
    if source_currency != destination_currency:
        raise errors.CurrencyMismatch(
            f"{source} settles in {source_currency} and {destination} in {destination_currency}: "
            "conversions run only within one currency",
            source_currency=source_currency,
            destination_currency=destination_currency,
        )
    return source_currency


def _ensure_row(conn: Connection, source: str, destination: str, now_ms: int) -> None:
    exists = conn.execute(
        select(routes.c.source_merchant_id).where(
            routes.c.source_merchant_id == source, routes.c.destination_merchant_id == destination
        )
    ).first()
    if exists is None:
        conn.execute(
            insert(routes).values(
                source_merchant_id=source,
                destination_merchant_id=destination,
                outbound_open=False,
                inbound_accepted=False,
                operator_closed=False,
                fee_bps=None,
                min_src_points=0,
                max_src_points=0,
                daily_member_cap_micros=0,
                updated_at_ms=now_ms,
            )
        )


def set_side(
    conn: Connection, merchant_id: str, partner_id: str, direction: str, enabled: bool, now_ms: int, default_fee: int
) -> RouteView:
    """The caller's own consent: outbound (it sends members to the partner) or inbound (it receives)."""
    merchants_mod.require_active(conn, merchant_id)
    source, destination = (merchant_id, partner_id) if direction == OUTBOUND else (partner_id, merchant_id)
    _pair_currency(conn, source, destination)
    _ensure_row(conn, source, destination, now_ms)
    column = "outbound_open" if direction == OUTBOUND else "inbound_accepted"
    conn.execute(
        update(routes)
        .where(routes.c.source_merchant_id == source, routes.c.destination_merchant_id == destination)
        .values({column: enabled, "updated_at_ms": now_ms})
    )
    return get(conn, source, destination, default_fee)


@dataclass(frozen=True)
class RouteTerms:
    fee_bps: int | None  # None: the network default
    min_src_points: int
    max_src_points: int
    daily_member_cap_micros: int
    closed: bool


def check_terms(terms: RouteTerms) -> RouteTerms:
    if terms.fee_bps is not None:
        check_fee_bps(terms.fee_bps)
    for name in ("min_src_points", "max_src_points"):
        value = getattr(terms, name)
        if not 0 <= value <= MAX_POINTS:
            raise errors.InvalidField(f"{name} must be between 0 (none) and {MAX_POINTS}", field=name)
    if terms.max_src_points and terms.min_src_points > terms.max_src_points:
        raise errors.InvalidField("min_src_points is above max_src_points", field="min_src_points")
    if not 0 <= terms.daily_member_cap_micros <= MAX_CAP_MICROS:
        raise errors.InvalidField(
            f"daily_member_cap_micros must be between 0 (none) and {MAX_CAP_MICROS}", field="daily_member_cap_micros"
        )
    return terms


def set_terms(
    conn: Connection, source: str, destination: str, terms: RouteTerms, now_ms: int, default_fee: int
) -> RouteView:
    """The operator's terms; setting them never opens a route the merchants have not agreed to."""
    _pair_currency(conn, source, destination)
    _ensure_row(conn, source, destination, now_ms)
    conn.execute(
        update(routes)
        .where(routes.c.source_merchant_id == source, routes.c.destination_merchant_id == destination)
        .values(
            fee_bps=terms.fee_bps,
            min_src_points=terms.min_src_points,
            max_src_points=terms.max_src_points,
            daily_member_cap_micros=terms.daily_member_cap_micros,
            operator_closed=terms.closed,
            updated_at_ms=now_ms,
        )
    )
    return get(conn, source, destination, default_fee)


_COLUMNS = (
    routes.c.source_merchant_id,
    routes.c.destination_merchant_id,
    routes.c.outbound_open,
    routes.c.inbound_accepted,
    routes.c.operator_closed,
    routes.c.fee_bps,
    routes.c.min_src_points,
    routes.c.max_src_points,
    routes.c.daily_member_cap_micros,
    merchants.c.currency,
)


def view_of(row: Any, default_fee: int) -> RouteView:
    """A route as read by one of this module's queries (`FIND_MANY`), the default fee filled in."""
    return RouteView(
        source_merchant_id=row.source_merchant_id,
        destination_merchant_id=row.destination_merchant_id,
        currency=row.currency,
        outbound_open=bool(row.outbound_open),
        inbound_accepted=bool(row.inbound_accepted),
        operator_closed=bool(row.operator_closed),
        fee_bps=default_fee if row.fee_bps is None else int(row.fee_bps),
        min_src_points=int(row.min_src_points),
        max_src_points=int(row.max_src_points),
        daily_member_cap_micros=int(row.daily_member_cap_micros),
    )


def _select() -> Select[Any]:
    return select(*_COLUMNS).join(merchants, merchants.c.merchant_id == routes.c.source_merchant_id)


def find(conn: Connection, source: str, destination: str, default_fee: int) -> RouteView | None:
    row = conn.execute(_FIND, {"s": source, "d": destination}).one_or_none()
    return None if row is None else view_of(row, default_fee)


# Built once (hot path): statement building and cache keys cost more than the database's work.
_FIND = _select().where(
    routes.c.source_merchant_id == bindparam("s"), routes.c.destination_merchant_id == bindparam("d")
)


FIND_MANY = _select().where(
    tuple_(routes.c.source_merchant_id, routes.c.destination_merchant_id).in_(bindparam("pairs", expanding=True))
)


def find_many(conn: Connection, pairs: list[tuple[str, str]], default_fee: int) -> dict[tuple[str, str], RouteView]:
    """Many routes by (source, destination), in one query; a pair without a route is absent."""
    rows = conn.execute(FIND_MANY, {"pairs": sorted(set(pairs))}).all()
    return {(r.source_merchant_id, r.destination_merchant_id): view_of(r, default_fee) for r in rows}


def get(conn: Connection, source: str, destination: str, default_fee: int) -> RouteView:
    found = find(conn, source, destination, default_fee)
    assert found is not None, "route row was just written"
    return found


def list_for(
    conn: Connection, merchant_id: str, after: tuple[str, str] | None, limit: int, default_fee: int
) -> list[RouteView]:
    """Routes the merchant is either side of, in (source, destination) order, keyset-paged."""
    query = _select().where(
        or_(routes.c.source_merchant_id == merchant_id, routes.c.destination_merchant_id == merchant_id)
    )
    if after is not None:
        query = query.where(
            tuple_(routes.c.source_merchant_id, routes.c.destination_merchant_id)
            > tuple_(literal(after[0]), literal(after[1]))
        )
    rows = conn.execute(
        query.order_by(routes.c.source_merchant_id, routes.c.destination_merchant_id).limit(limit)
    ).all()
    return [view_of(r, default_fee) for r in rows]


def partners_of(conn: Connection, merchant_id: str) -> list[str]:
    """Every merchant with a route to or from this one: they hear of its value changes."""
    rows = conn.execute(
        select(routes.c.source_merchant_id, routes.c.destination_merchant_id).where(
            or_(routes.c.source_merchant_id == merchant_id, routes.c.destination_merchant_id == merchant_id)
        )
    ).all()
    return sorted({s if s != merchant_id else d for s, d in rows})


def announce_value_change(conn: Connection, merchant_id: str, value_micros: int, effective_at_ms: int) -> None:
    """Tell the merchant and every route partner, in the commit that schedules the value."""
    for recipient in [merchant_id, *partners_of(conn, merchant_id)]:
        outbox.emit(
            conn,
            outbox.StagedEvent(
                recipient,
                outbox.POINT_VALUE_CHANGED,
                merchant_id,
                value_micros=value_micros,
                effective_at_ms=effective_at_ms,
            ),
        )
