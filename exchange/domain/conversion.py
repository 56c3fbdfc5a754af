"""Conversion arithmetic, exactly as DESIGN §1 (normative). Integers only; every rounding named.

    src_cash   = src_points * S.value_micros
    fee        = ceil(src_cash * fee_bps / 10000)        rounds up: the platform never undercharges
    dst_points = floor((src_cash - fee) / D.value_micros) rounds down: never more value out than in
    dst_cash   = dst_points * D.value_micros
    residue    = src_cash - fee - dst_cash                0 <= residue < D.value_micros
    platform   = fee + residue

S owes src_cash, D is owed dst_cash, the platform is owed platform: src_cash = dst_cash + platform.
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.domain import errors
from exchange.domain.units import MAX_CONVERSION_CASH_MICROS, MAX_POINTS, check_points

BPS_DENOMINATOR = 10_000


@dataclass(frozen=True)
class ConversionAmounts:
    src_points: int
    dst_points: int
    src_value_micros: int
    dst_value_micros: int
    fee_bps: int
    src_cash: int
    fee: int
    dst_cash: int
    residue: int

    @property
    def platform(self) -> int:
        return self.fee + self.residue


def _ceil_div(numerator: int, denominator: int) -> int:
    return -((-numerator) // denominator)


def check_fee_bps(fee_bps: int) -> int:
    if not 0 <= fee_bps <= BPS_DENOMINATOR:
        raise errors.InvalidField(f"fee_bps must be between 0 and {BPS_DENOMINATOR}, got {fee_bps}", field="fee_bps")
    return fee_bps


def convert_amounts(src_points: int, src_value_micros: int, dst_value_micros: int, fee_bps: int) -> ConversionAmounts:
    """Amounts for converting `src_points`; AMOUNT_TOO_SMALL when not one destination point results."""
    check_points(src_points, "src_points")
    assert src_value_micros > 0 and dst_value_micros > 0 and 0 <= fee_bps <= BPS_DENOMINATOR
    src_cash = src_points * src_value_micros
    if src_cash > MAX_CONVERSION_CASH_MICROS:
        raise errors.AmountTooLarge(
            f"one conversion moves at most {MAX_CONVERSION_CASH_MICROS} micros; {src_points} points are {src_cash}"
        )
    fee = _ceil_div(src_cash * fee_bps, BPS_DENOMINATOR)
    dst_points = (src_cash - fee) // dst_value_micros
    if dst_points < 1:
        raise errors.AmountTooSmall(
            f"{src_points} points yield less than one destination point after the fee", src_points=str(src_points)
        )
    if dst_points > MAX_POINTS:
        raise errors.AmountTooLarge(
            f"{src_points} points would issue {dst_points} destination points; one operation moves at most {MAX_POINTS}"
        )
    dst_cash = dst_points * dst_value_micros
    residue = src_cash - fee - dst_cash
    assert 0 <= residue < dst_value_micros
    assert src_cash == dst_cash + fee + residue
    return ConversionAmounts(
        src_points, dst_points, src_value_micros, dst_value_micros, fee_bps, src_cash, fee, dst_cash, residue
    )


def _yield(src_points: int, src_value_micros: int, dst_value_micros: int, fee_bps: int) -> int:
    src_cash = src_points * src_value_micros
    fee = _ceil_div(src_cash * fee_bps, BPS_DENOMINATOR)
    return (src_cash - fee) // dst_value_micros


def amounts_for_destination(
    dst_points: int, src_value_micros: int, dst_value_micros: int, fee_bps: int
) -> ConversionAmounts:
    """The smallest src_points whose conversion yields at least `dst_points` (DESIGN §1).

    The yield is monotone non-decreasing in src_points, so an estimate from the exact rational
    inverse, corrected by a short walk, finds the minimum without search over the whole range.
    """
    check_points(dst_points, "dst_points")
    if fee_bps >= BPS_DENOMINATOR:
        raise errors.AmountTooSmall("a 100% fee route yields no destination points")
    # Need: src_cash - ceil(src_cash * bps / 10000) >= dst_points * dst_value.
    # Lower bound: src_cash * (10000 - bps) / 10000 >= target  =>  src_cash >= target*10000/(10000-bps).
    target = dst_points * dst_value_micros
    min_cash = _ceil_div(target * BPS_DENOMINATOR, BPS_DENOMINATOR - fee_bps)
    src_points = max(1, _ceil_div(min_cash, src_value_micros))
    if src_points > MAX_POINTS:
        raise errors.AmountTooLarge(f"{dst_points} destination points need more than {MAX_POINTS} source points")
    while src_points > 1 and _yield(src_points - 1, src_value_micros, dst_value_micros, fee_bps) >= dst_points:
        src_points -= 1
    while _yield(src_points, src_value_micros, dst_value_micros, fee_bps) < dst_points:
        src_points += 1
        if src_points > MAX_POINTS:
            raise errors.AmountTooLarge(f"{dst_points} destination points need more than {MAX_POINTS} source points")
    return convert_amounts(src_points, src_value_micros, dst_value_micros, fee_bps)
