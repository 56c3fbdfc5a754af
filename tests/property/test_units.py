"""Property tests of the unit rules: exact decimal parsing, ids, operation-id ordering."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.domain import errors, units


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_micros_round_trip_through_decimal_text(micros: int) -> None:
    assert units.parse_cash_decimal(units.format_micros(micros)) == micros


@given(
    st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("1e9"), allow_nan=False, allow_infinity=False, places=7)
)
def test_parse_is_exact_or_refuses(amount: Decimal) -> None:
    micros = amount * 1_000_000
    if micros == micros.to_integral_value():
        assert units.parse_cash_decimal(str(amount)) == int(micros)
    else:
        with pytest.raises(errors.InvalidPointValue):
            units.parse_cash_decimal(str(amount))


@given(st.integers(min_value=0, max_value=10**15), st.integers(min_value=0, max_value=10**15))
def test_operation_ids_sort_as_their_numbers(a: int, b: int) -> None:
    assert (units.format_operation_id(a) < units.format_operation_id(b)) == (a < b)
    assert units.parse_operation_id(units.format_operation_id(a)) == a


@given(st.integers())
def test_points_outside_the_range_are_refused(points: int) -> None:
    if units.MIN_POINTS <= points <= units.MAX_POINTS:
        assert units.check_points(points) == points
    else:
        with pytest.raises(errors.InvalidAmount):
            units.check_points(points)


@given(st.text(max_size=80))
def test_member_refs_accept_only_the_documented_alphabet(text: str) -> None:
    ok = 1 <= len(text) <= 128 and all(c.isascii() and (c.isalnum() or c in "._:@+-") for c in text)
    if ok:
        assert units.check_member_ref(text) == text
    else:
        with pytest.raises(errors.InvalidMemberRef):
            units.check_member_ref(text)


def test_request_id_must_be_a_canonical_uuid() -> None:
    assert units.check_request_id("6F9619FF-8B86-D011-B42D-00C04FC964FF") == "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    for bad in ("", "nope", "6f9619ff8b86d011b42d00c04fc964ff", "{6f9619ff-8b86-d011-b42d-00c04fc964ff}"):
        with pytest.raises(errors.InvalidRequestId):
            units.check_request_id(bad)


@pytest.mark.parametrize("value", ["alice\n", "brew\n"])
def test_a_trailing_newline_is_not_part_of_an_id(value: str) -> None:
    """`$` in a regex also matches before a final newline; ids are matched whole."""
    with pytest.raises(errors.InvalidMemberRef):
        units.check_member_ref(value)
    with pytest.raises(errors.InvalidMerchantId):
        units.check_merchant_id(value)
