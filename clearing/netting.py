"""Settlement arithmetic of a cycle (DESIGN §1 and §5, normative). Integers only.

    net         = receivable - payable + opening_carry          (positive: the network pays)
    settlement  = net rounded toward zero to the currency's minor unit
    carry       = net - settlement                              (into the next cycle)

The platform's settlement is minus the sum of the merchants', so every cycle's instructions sum
to exactly zero; the platform's carry absorbs the difference and no micro is ever lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from exchange.domain.units import MICROS_PER_UNIT, MINOR_UNITS

PLATFORM = "platform"


def micros_per_minor(currency: str) -> int:
    return MICROS_PER_UNIT // int(10 ** MINOR_UNITS[currency])


def settle_toward_zero(net_micros: int, currency: str) -> tuple[int, int]:
    """(settlement in minor units, carry in micros): truncation toward zero, the carry keeps the rest."""
    step = micros_per_minor(currency)
    minor = abs(net_micros) // step * (1 if net_micros >= 0 else -1)
    return minor, net_micros - minor * step


@dataclass(frozen=True)
class PositionInput:
    merchant_id: str
    opening_carry: int
    payable: int
    receivable: int


@dataclass(frozen=True)
class CyclePosition:
    merchant_id: str  # or PLATFORM
    opening_carry: int
    payable: int
    receivable: int
    fees: int  # the platform's fees and residues (0 for merchants)
    net: int
    settlement_minor: int
    closing_carry: int


def net_cycle(
    currency: str, merchants: list[PositionInput], platform_fees: int, platform_opening_carry: int
) -> list[CyclePosition]:
    """Merchants' rows in the given order, then the platform's; nets and settlements sum to zero."""
    step = micros_per_minor(currency)
    rows: list[CyclePosition] = []
    for m in merchants:
        net = m.receivable - m.payable + m.opening_carry
        minor, carry = settle_toward_zero(net, currency)
        rows.append(CyclePosition(m.merchant_id, m.opening_carry, m.payable, m.receivable, 0, net, minor, carry))
    platform_net = platform_fees + platform_opening_carry
    platform_minor = -sum(r.settlement_minor for r in rows)
    rows.append(
        CyclePosition(
            PLATFORM,
            platform_opening_carry,
            0,
            0,
            platform_fees,
            platform_net,
            platform_minor,
            platform_net - platform_minor * step,
        )
    )
    if sum(r.net for r in rows) != 0:
        raise AssertionError(f"cycle nets sum to {sum(r.net for r in rows)}, not zero: value created or lost")
    return rows
