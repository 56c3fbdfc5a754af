"""The checks a conversion must pass, each raising its typed refusal: pure, shared by every writer.

They take values already read (a merchant's status, a route's terms, a balance) and raise the
domain error DESIGN §4 names, with the same message and metadata whoever calls them — the
conversion engine (exchange/domain/decider.py) and the ledger's single-row writes (issue, redeem,
the net debit cap's guarded update) — so a refusal reads the same on every path.
"""

from __future__ import annotations

from exchange.domain import errors
from exchange.domain.conversion import ConversionAmounts
from exchange.domain.models import RouteView
from exchange.domain.units import MAX_BALANCE_POINTS


def merchant_not_found(merchant_id: str) -> errors.MerchantNotFound:
    return errors.MerchantNotFound(f"merchant {merchant_id} is not registered", merchant_id=merchant_id)


def check_active(merchant_id: str, status_currency: tuple[str, str] | None) -> str:
    """The currency of a registered, active merchant given its (status, currency) as read."""
    if status_currency is None:
        raise merchant_not_found(merchant_id)
    status, currency = status_currency
    if status != "active":
        raise errors.MerchantSuspended(f"merchant {merchant_id} is suspended", merchant_id=merchant_id)
    return currency


def check_distinct(source: str, destination: str) -> None:
    if source == destination:
        raise errors.SameMerchant("a conversion runs between two different merchants", merchant_id=source)


def check_currencies(source: str, destination: str, source_currency: str, destination_currency: str) -> None:
    if source_currency != destination_currency:
        raise errors.CurrencyMismatch(
            f"{source} settles in {source_currency} and {destination} in {destination_currency}",
            source_currency=source_currency,
            destination_currency=destination_currency,
        )


def check_open(source: str, destination: str, route: RouteView | None) -> RouteView:
    """The route as read, if conversions may run on it now; ROUTE_CLOSED says which consent is missing."""
    if route is None:
        raise errors.RouteClosed(f"there is no route from {source} to {destination}", state="none")
    if route.operator_closed:
        raise errors.RouteClosed(f"the operator closed the route {source} -> {destination}", state="closed")
    missing = [
        text
        for text, ok in (
            (f"{source} has not opened it outbound", route.outbound_open),
            (f"{destination} has not accepted it inbound", route.inbound_accepted),
        )
        if not ok
    ]
    if missing:
        raise errors.RouteClosed(f"route {source} -> {destination} is not open: {'; '.join(missing)}", state="pending")
    return route


def not_enrolled(merchant_id: str, member_ref: str) -> errors.MemberNotFound:
    return errors.MemberNotFound(f"member {member_ref} is not enrolled at {merchant_id}", member_ref=member_ref)


def not_linked(member_ref: str, source: str, destination: str) -> errors.NotLinked:
    return errors.NotLinked(
        f"member {member_ref} of {source} has no linked account at {destination}",
        member_ref=member_ref,
        destination_merchant_id=destination,
    )


def check_route_limits(route: RouteView, src_points: int) -> None:
    if route.min_src_points and src_points < route.min_src_points:
        raise errors.AmountTooSmall(
            f"route {route.source_merchant_id} -> {route.destination_merchant_id} converts at least "
            f"{route.min_src_points} points",
            min_src_points=str(route.min_src_points),
        )
    if route.max_src_points and src_points > route.max_src_points:
        raise errors.AmountTooLarge(
            f"route {route.source_merchant_id} -> {route.destination_merchant_id} converts at most "
            f"{route.max_src_points} points",
            max_src_points=str(route.max_src_points),
        )


def check_min_dst(destination: str, min_dst_points: int, amounts: ConversionAmounts) -> None:
    if min_dst_points and amounts.dst_points < min_dst_points:
        raise errors.MinDstPointsNotMet(
            f"{amounts.src_points} points yield {amounts.dst_points} at {destination} now, "
            f"fewer than the {min_dst_points} asked for",
            dst_points=str(amounts.dst_points),
            min_dst_points=str(min_dst_points),
        )


def check_daily_cap(route: RouteView, member_ref: str, used_micros: int, src_cash: int) -> None:
    cap = route.daily_member_cap_micros
    if cap and used_micros + src_cash > cap:
        raise errors.DailyLimitExceeded(
            f"member {member_ref} has converted {used_micros} of {cap} micros today on this route; "
            f"{src_cash} more would pass the cap",
            member_ref=member_ref,
            used_micros=str(used_micros),
            cap_micros=str(cap),
        )


def insufficient(member_ref: str, balance: int, points: int) -> errors.InsufficientPoints:
    return errors.InsufficientPoints(
        f"member {member_ref} holds {balance} points, {points} requested", member_ref=member_ref, balance=str(balance)
    )


def over_ceiling(member_ref: str) -> errors.BalanceLimitExceeded:
    return errors.BalanceLimitExceeded(
        f"member {member_ref} would hold more than {MAX_BALANCE_POINTS} points", member_ref=member_ref
    )


def cap_exceeded(merchant_id: str, position: int, cap_micros: int, amount_micros: int) -> errors.NetDebitCapExceeded:
    return errors.NetDebitCapExceeded(
        f"{merchant_id}'s open position is {position} micros; {amount_micros} more would pass its net debit cap "
        f"of {cap_micros}",
        merchant_id=merchant_id,
        open_net_micros=str(position),
        net_debit_cap_micros=str(cap_micros),
    )


def quote_not_found(quote_id: str) -> errors.QuoteNotFound:
    return errors.QuoteNotFound(f"quote {quote_id} does not exist", quote_id=quote_id)


def quote_mismatch(quote_id: str, mismatches: list[str]) -> errors.QuoteMismatch:
    return errors.QuoteMismatch(
        f"quote {quote_id} was for another {', '.join(mismatches)}", quote_id=quote_id, fields=",".join(mismatches)
    )


def quote_used(quote_id: str) -> errors.QuoteAlreadyUsed:
    return errors.QuoteAlreadyUsed(f"quote {quote_id} has already been converted", quote_id=quote_id)


def quote_expired(quote_id: str, expires_at_ms: int) -> errors.QuoteExpired:
    return errors.QuoteExpired(
        f"quote {quote_id} expired; ask for a new one", quote_id=quote_id, expired_at_ms=str(expires_at_ms)
    )
