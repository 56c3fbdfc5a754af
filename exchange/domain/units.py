"""Units, limits and the shape of identifiers (DESIGN §1). Points and micros are always `int`."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal, InvalidOperation

from exchange.domain import errors

MICROS_PER_UNIT = 1_000_000
MIN_POINTS = 1
MAX_POINTS = 10**12  # one operation moves 1 .. 10^12 points (DESIGN §1)
# A member balance ceiling far below int64 so sums over many members never overflow a BIGINT.
MAX_BALANCE_POINTS = 10**15
# One point is worth at most 1,000 currency units: keeps points * value inside int64 micros.
MAX_VALUE_MICROS = 10**9
MAX_CAP_MICROS = 10**15
# One conversion moves at most 10^9 currency units of cash: sums of many stay inside int64.
MAX_CONVERSION_CASH_MICROS = 10**15

# ISO 4217 codes the hub knows, with their minor units (settlement rounding, DESIGN §1).
MINOR_UNITS: dict[str, int] = {
    "AED": 2, "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CNY": 2, "CZK": 2, "DKK": 2,
    "EUR": 2, "GBP": 2, "HKD": 2, "IDR": 2, "INR": 2, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3,
    "MXN": 2, "MYR": 2, "NOK": 2, "NZD": 2, "OMR": 3, "PHP": 2, "PLN": 2, "SAR": 2, "SEK": 2,
    "SGD": 2, "THB": 2, "TND": 3, "TRY": 2, "TWD": 2, "USD": 2, "VND": 0, "ZAR": 2,
}  # fmt: skip

_MERCHANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{1,62}$")
_MEMBER_REF = re.compile(r"^[A-Za-z0-9._:@+\-]{1,128}$")
OPERATOR = "operator"
RESERVED_IDS = frozenset({OPERATOR, "platform", "network", "settlement"})


def check_points(points: int, field: str = "points") -> int:
    if not MIN_POINTS <= points <= MAX_POINTS:
        raise errors.InvalidAmount(f"{field} must be between {MIN_POINTS} and {MAX_POINTS}, got {points}", field=field)
    return points


def check_value_micros(value_micros: int) -> int:
    if not 1 <= value_micros <= MAX_VALUE_MICROS:
        raise errors.InvalidPointValue(
            f"point value must be between 1 and {MAX_VALUE_MICROS} micros, got {value_micros}"
        )
    return value_micros


def check_cap_micros(cap_micros: int) -> int:
    if not 0 <= cap_micros <= MAX_CAP_MICROS:
        raise errors.InvalidAmount(f"net debit cap must be between 0 and {MAX_CAP_MICROS} micros", field="cap")
    return cap_micros


def check_merchant_id(merchant_id: str) -> str:
    if not _MERCHANT_ID.fullmatch(merchant_id) or merchant_id in RESERVED_IDS:
        raise errors.InvalidMerchantId(
            f"merchant id {merchant_id[:80]!r} must match [a-z0-9][a-z0-9_-]{{1,62}} and not be reserved"
        )
    return merchant_id


def check_member_ref(member_ref: str) -> str:
    if not _MEMBER_REF.fullmatch(member_ref):
        raise errors.InvalidMemberRef(f"member_ref {member_ref[:80]!r} must be 1-128 of [A-Za-z0-9._:@+-]")
    return member_ref


def check_request_id(request_id: str) -> str:
    """Client-made UUID in its canonical lowercase form, so one retry is never two keys."""
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != request_id.lower() or len(request_id) != 36:
        raise errors.InvalidRequestId(f"request_id must be a UUID, got {request_id[:80]!r}")
    return request_id.lower()


def check_currency(code: str, accepted: frozenset[str]) -> str:
    if code not in MINOR_UNITS or code not in accepted:
        raise errors.UnsupportedCurrency(f"currency {code[:10]!r} is not accepted by this network")
    return code


def check_text(value: str, field: str, *, max_len: int, required: bool = False) -> str:
    if required and not value.strip():
        raise errors.InvalidField(f"{field} is required", field=field)
    if len(value) > max_len or any(ord(c) < 32 for c in value):
        raise errors.InvalidField(f"{field} must be at most {max_len} printable characters", field=field)
    return value


def parse_cash_decimal(text: str) -> int:
    """'0.01' currency units -> 10000 micros, exactly; refuses anything finer than a micro."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise errors.InvalidPointValue(f"{text!r} is not a decimal number") from None
    if not amount.is_finite():
        raise errors.InvalidPointValue(f"{text!r} is not a finite amount")
    micros = amount * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise errors.InvalidPointValue(f"{text!r} is finer than one micro (10^-6)")
    return int(micros)


def format_micros(micros: int) -> str:
    """10000 -> '0.010000' (exact; for people, never parsed back into arithmetic)."""
    sign = "-" if micros < 0 else ""
    units, frac = divmod(abs(micros), MICROS_PER_UNIT)
    return f"{sign}{units}.{frac:06d}"


def format_operation_id(seq: int) -> str:
    """Fixed width, so string order equals numeric order in every client language."""
    return f"op_{seq:016d}"


def parse_operation_id(text: str) -> int:
    if not re.fullmatch(r"op_\d{16}", text):
        raise errors.InvalidField(f"operation id {text[:40]!r} is malformed", field="operation_id")
    return int(text[3:])
