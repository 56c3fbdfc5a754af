"""Property tests of DESIGN §1's conversion arithmetic: conservation and rounding directions."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from exchange.domain import conversion, errors
from exchange.domain.units import MAX_CONVERSION_CASH_MICROS, MAX_POINTS, MAX_VALUE_MICROS

points = st.integers(min_value=1, max_value=10**12)
values = st.one_of(st.integers(min_value=1, max_value=MAX_VALUE_MICROS), st.sampled_from([1, 2_000, 10_000, 50_000]))
fees = st.one_of(st.integers(min_value=0, max_value=10_000), st.sampled_from([0, 1, 100, 250, 9_999]))


@given(points, values, values, fees)
def test_conversion_conserves_every_micro(src_points: int, sv: int, dv: int, bps: int) -> None:
    try:
        a = conversion.convert_amounts(src_points, sv, dv, bps)
    except errors.AmountTooSmall:
        assert (src_points * sv - -(-(src_points * sv * bps) // 10_000)) // dv < 1
        return
    except errors.AmountTooLarge:
        fee = -(-(src_points * sv * bps) // 10_000)
        assert src_points * sv > MAX_CONVERSION_CASH_MICROS or (src_points * sv - fee) // dv > MAX_POINTS
        return
    assert a.dst_points <= MAX_POINTS  # one operation moves at most 10^12 points (DESIGN §1)
    assert a.src_cash == src_points * sv
    assert a.src_cash == a.dst_cash + a.platform  # S owes = D is owed + platform is owed
    assert a.dst_points >= 1
    assert a.dst_cash == a.dst_points * dv
    assert 0 <= a.residue < dv
    # fee rounds up: the exact fee never exceeds it, and it is less than one micro above it
    assert a.fee * 10_000 >= a.src_cash * bps > (a.fee - 1) * 10_000
    # destination points round down: one more would need more cash than is left after the fee
    assert (a.dst_points + 1) * dv > a.src_cash - a.fee


@given(st.integers(min_value=1, max_value=10**9), values, values, st.integers(min_value=0, max_value=9_999))
def test_quote_by_destination_is_the_smallest_source(dst_points: int, sv: int, dv: int, bps: int) -> None:
    try:
        a = conversion.amounts_for_destination(dst_points, sv, dv, bps)
    except errors.AmountTooLarge:
        return
    assert a.dst_points >= dst_points
    if a.src_points > 1:
        try:
            smaller = conversion.convert_amounts(a.src_points - 1, sv, dv, bps)
        except errors.AmountTooSmall:
            return
        assert smaller.dst_points < dst_points


@given(points, values, values)
def test_zero_fee_leaves_only_the_residue(src_points: int, sv: int, dv: int) -> None:
    assume(src_points * sv >= dv and src_points * sv <= MAX_CONVERSION_CASH_MICROS)
    assume(src_points * sv // dv <= MAX_POINTS)
    a = conversion.convert_amounts(src_points, sv, dv, 0)
    assert a.fee == 0 and a.platform == a.residue


def test_worked_example() -> None:
    # 1,000 coffee points at 0.01 CNY into airline miles at 0.05 CNY, 1% fee
    a = conversion.convert_amounts(1_000, 10_000, 50_000, 100)
    assert (a.src_cash, a.fee, a.dst_points, a.dst_cash, a.residue) == (10_000_000, 100_000, 198, 9_900_000, 0)
    b = conversion.convert_amounts(7, 10_000, 50_000, 100)  # 70,000 - 700 = 69,300 -> 1 mile, residue 19,300
    assert (b.dst_points, b.residue, b.platform) == (1, 19_300, 20_000)
    with pytest.raises(errors.AmountTooSmall):
        conversion.convert_amounts(5, 10_000, 50_000, 100)
