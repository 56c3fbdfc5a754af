"""The one conversion engine: a snapshot and an ordered list of orders in, decisions out.

Every conversion — one `Convert`, the items of a `ConvertBatch`, the conversions a writer batch
gathers from many callers, a quote — is decided here, and only here. The decider knows no SQL and
no gRPC: the store (exchange/ledger/conversion_store.py) reads a `Snapshot` of what the orders
touch, with the row locks that make it exact, calls `decide`, and writes the decisions set-based.
A unary conversion is a batch of one.

The outcome of each order is the one it would get if the orders ran one after another: the same
checks in the same order (DESIGN §4), each seeing the balances, positions, daily totals and spent
quotes its predecessors left, and the same refusal, with the same reason and message, when one
fails. A refused order changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from exchange.domain import errors, refusals
from exchange.domain.conversion import ConversionAmounts, amounts_for_destination, convert_amounts
from exchange.domain.models import RouteView
from exchange.domain.units import MAX_BALANCE_POINTS

DAY_MS = 86_400_000


def day_start(now_ms: int) -> int:
    """The start of the UTC calendar day a daily cap counts in."""
    return now_ms - now_ms % DAY_MS


@dataclass(frozen=True)
class ConvertOrder:
    """What a merchant asked to convert for one of its members, validated at the edge."""

    source: str
    destination: str
    member_ref: str
    src_points: int  # 0 with a quote: take the quoted amount
    quote_id: str | None
    min_dst_points: int  # 0: no guard


@dataclass(frozen=True)
class TimedOrder:
    """An order and the hub time it is decided at (each request of a batch keeps its own)."""

    order: ConvertOrder
    now_ms: int


@dataclass(frozen=True)
class MerchantFacts:
    status: str
    currency: str
    net_debit_cap_micros: int


@dataclass(frozen=True)
class MemberFacts:
    network_member_id: str
    points: int


@dataclass(frozen=True)
class QuoteFacts:
    source: str
    destination: str
    member_ref: str
    src_points: int
    src_value_micros: int
    dst_value_micros: int
    fee_bps: int
    expires_at_ms: int
    used: bool


@dataclass(frozen=True)
class Snapshot:
    """What the orders touch, as read under the store's locks. Absent keys mean "does not exist"."""

    merchants: Mapping[str, MerchantFacts]
    routes: Mapping[tuple[str, str], RouteView]
    members: Mapping[tuple[str, str], MemberFacts]  # (merchant, member_ref)
    links: Mapping[tuple[str, str], str]  # (network member, merchant) -> member_ref there
    # merchant -> [(effective_at_ms, value_micros)], newest first, reaching back to the value in
    # force at the earliest order's time (or the merchant's first value, if that is later).
    values: Mapping[str, Sequence[tuple[int, int]]]
    quotes: Mapping[str, QuoteFacts] = field(default_factory=dict)
    positions: Mapping[str, int] = field(default_factory=dict)  # open-cycle net, micros
    used_today: Mapping[tuple[int, str, str, str], int] = field(default_factory=dict)  # (day, S, ref, D)
    fences: Mapping[str, int] = field(default_factory=dict)  # currency -> earliest stamp allowed


@dataclass(frozen=True)
class Decision:
    """An accepted conversion: who, what, and the clearing stamp it lands under."""

    source: str
    destination: str
    src_member_ref: str
    dst_member_ref: str
    currency: str
    amounts: ConversionAmounts
    quote_id: str | None
    stamped_ms: int


@dataclass
class Decided:
    """Every order's decision or refusal, in order, and the net effect of the accepted ones."""

    outcomes: list[Decision | errors.DomainError]
    balances: dict[tuple[str, str], int]  # the new balance of each member an accepted order moved
    position_deltas: dict[str, int]  # merchant -> summed change of its open-cycle position


@dataclass(frozen=True)
class _Pair:
    route: RouteView
    dst_member_ref: str


def _pair(snapshot: Snapshot, order: ConvertOrder) -> _Pair:
    """Both merchants active in one currency, the route open, the member linked at D."""
    refusals.check_distinct(order.source, order.destination)
    source, destination = snapshot.merchants.get(order.source), snapshot.merchants.get(order.destination)
    source_currency = refusals.check_active(order.source, None if source is None else (source.status, source.currency))
    destination_currency = refusals.check_active(
        order.destination, None if destination is None else (destination.status, destination.currency)
    )
    refusals.check_currencies(order.source, order.destination, source_currency, destination_currency)
    route = refusals.check_open(order.source, order.destination, snapshot.routes.get((order.source, order.destination)))
    member = snapshot.members.get((order.source, order.member_ref))
    if member is None:
        raise refusals.not_enrolled(order.source, order.member_ref)
    dst_member_ref = snapshot.links.get((member.network_member_id, order.destination))
    if dst_member_ref is None:
        raise refusals.not_linked(order.member_ref, order.source, order.destination)
    return _Pair(route, dst_member_ref)


def value_at(snapshot: Snapshot, merchant_id: str, now_ms: int) -> int:
    """The value in force at `now_ms`; before admission (a clock a little behind), the first one."""
    values = snapshot.values[merchant_id]
    for effective_at_ms, value_micros in values:
        if effective_at_ms <= now_ms:
            return value_micros
    return values[-1][1]


def quote_amounts(
    snapshot: Snapshot, order: ConvertOrder, now_ms: int, *, dst_points: int | None = None
) -> tuple[str, ConversionAmounts]:
    """A quote's (currency, amounts) at the values in force now, from `order.src_points` or a
    wanted `dst_points`: the checks of a conversion before any balance is looked at."""
    pair = _pair(snapshot, order)
    src_value = value_at(snapshot, order.source, now_ms)
    dst_value = value_at(snapshot, order.destination, now_ms)
    if dst_points is not None:
        amounts = amounts_for_destination(dst_points, src_value, dst_value, pair.route.fee_bps)
    else:
        amounts = convert_amounts(order.src_points, src_value, dst_value, pair.route.fee_bps)
    refusals.check_route_limits(pair.route, amounts.src_points)
    return pair.route.currency, amounts


class _Running:
    """The state the orders decided so far have left: balances, positions, daily totals, quotes."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.balances: dict[tuple[str, str], int] = {}
        self.positions: dict[str, int] = {}
        self.position_deltas: dict[str, int] = {}
        # (S, member_ref, D) -> [(stamp, src_cash)] of the conversions this batch accepted so far.
        self.converted: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
        self.spent_quotes: set[str] = set()

    def balance(self, key: tuple[str, str]) -> int:
        return self.balances.get(key, self.snapshot.members[key].points)

    def position(self, merchant_id: str) -> int:
        return self.positions.get(merchant_id, self.snapshot.positions[merchant_id])

    def used(self, day: int, route_key: tuple[str, str, str]) -> int:
        """Cash converted on the route by the member since `day` began: committed conversions and
        this batch's, both counted by their clearing stamp, the way the store counts."""
        earlier = sum(cash for stamp, cash in self.converted.get(route_key, ()) if stamp >= day)
        return self.snapshot.used_today.get((day, *route_key), 0) + earlier


def _quoted(running: _Running, order: ConvertOrder, now_ms: int) -> ConversionAmounts:
    """The quoted amounts, if this order is the one the quote was for and it is still live."""
    assert order.quote_id is not None
    quote = running.snapshot.quotes.get(order.quote_id)
    if quote is None or quote.source != order.source:
        raise refusals.quote_not_found(order.quote_id)
    mismatches = [
        name
        for name, ok in (
            ("destination_merchant_id", quote.destination == order.destination),
            ("member_ref", quote.member_ref == order.member_ref),
            ("src_points", order.src_points in (0, quote.src_points)),
        )
        if not ok
    ]
    if mismatches:
        raise refusals.quote_mismatch(order.quote_id, mismatches)
    if quote.used or order.quote_id in running.spent_quotes:
        raise refusals.quote_used(order.quote_id)
    if now_ms >= quote.expires_at_ms:
        raise refusals.quote_expired(order.quote_id, quote.expires_at_ms)
    return convert_amounts(quote.src_points, quote.src_value_micros, quote.dst_value_micros, quote.fee_bps)


def _decide_one(running: _Running, timed: TimedOrder) -> Decision:
    """One order against the running state; raises its refusal with the running state untouched."""
    snapshot, order, now_ms = running.snapshot, timed.order, timed.now_ms
    pair = _pair(snapshot, order)
    route = pair.route
    if order.quote_id is not None:
        amounts = _quoted(running, order, now_ms)
    else:
        amounts = convert_amounts(
            order.src_points,
            value_at(snapshot, order.source, now_ms),
            value_at(snapshot, order.destination, now_ms),
            route.fee_bps,
        )
    refusals.check_min_dst(order.destination, order.min_dst_points, amounts)
    refusals.check_route_limits(route, amounts.src_points)
    # Balances: the debit and the credit checked in merchant-id order, the order rows are locked in.
    debtor, creditor = (order.source, order.member_ref), (order.destination, pair.dst_member_ref)
    debtor_points, creditor_points = running.balance(debtor), running.balance(creditor)

    def debit() -> None:
        if debtor_points < amounts.src_points:
            raise refusals.insufficient(order.member_ref, debtor_points, amounts.src_points)

    def credit() -> None:
        if creditor_points > MAX_BALANCE_POINTS - amounts.dst_points:
            raise refusals.over_ceiling(pair.dst_member_ref)

    for check in (debit, credit) if order.source <= order.destination else (credit, debit):
        check()
    day, route_key = day_start(now_ms), (order.source, order.member_ref, order.destination)
    if route.daily_member_cap_micros:
        refusals.check_daily_cap(route, order.member_ref, running.used(day, route_key), amounts.src_cash)
    position = running.position(order.source)
    cap = snapshot.merchants[order.source].net_debit_cap_micros
    if position - amounts.src_cash < -cap:
        raise refusals.cap_exceeded(order.source, position, cap, amounts.src_cash)
    # Every check passed: apply the order to the running state.
    running.balances[debtor] = debtor_points - amounts.src_points
    running.balances[creditor] = running.balance(creditor) + amounts.dst_points
    running.positions[order.source] = position - amounts.src_cash
    running.positions[order.destination] = running.position(order.destination) + amounts.dst_cash
    for merchant_id, delta in ((order.source, -amounts.src_cash), (order.destination, amounts.dst_cash)):
        running.position_deltas[merchant_id] = running.position_deltas.get(merchant_id, 0) + delta
    stamped_ms = max(now_ms, snapshot.fences.get(route.currency, 0))  # never inside a fenced window
    running.converted.setdefault(route_key, []).append((stamped_ms, amounts.src_cash))
    if order.quote_id is not None:
        running.spent_quotes.add(order.quote_id)
    return Decision(
        source=order.source,
        destination=order.destination,
        src_member_ref=order.member_ref,
        dst_member_ref=pair.dst_member_ref,
        currency=route.currency,
        amounts=amounts,
        quote_id=order.quote_id,
        stamped_ms=stamped_ms,
    )


def decide(snapshot: Snapshot, orders: Sequence[TimedOrder]) -> Decided:
    """Each order's decision or refusal, in order, as if they had run one after another."""
    running = _Running(snapshot)
    outcomes: list[Decision | errors.DomainError] = []
    for timed in orders:
        try:
            outcomes.append(_decide_one(running, timed))
        except errors.DomainError as refusal:
            outcomes.append(refusal)
    moved = {key: points for key, points in running.balances.items() if points != snapshot.members[key].points}
    # A member moved and moved back keeps its row untouched; every delta is kept, zero ones dropped.
    return Decided(
        outcomes=outcomes,
        balances=moved,
        position_deltas={m: d for m, d in running.position_deltas.items() if d},
    )
