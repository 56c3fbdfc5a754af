"""Stored outcomes: a domain result's canonical bytes decode to an equal value, and nothing else decodes."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from exchange.domain import outcomes
from exchange.domain.conversion import convert_amounts
from exchange.domain.models import BankDetails, ConversionRecord, KeyRecord, MerchantView, PointValue


def _merchant() -> MerchantView:
    return MerchantView(
        merchant_id="brew", name="Brew & Co. 咖啡", currency="CNY", status="active",
        point_value=PointValue(10_000, 1), scheduled_values=[PointValue(12_000, 2), PointValue(9_000, 3)],
        net_debit_cap_micros=5 * 10**9, bank=BankDetails(iban="DE89370400440532013000"),
        keys=[KeyRecord("ab" * 8, "brew", bytes(range(32)), "revoked", 1, None)], created_at_ms=1,
    )  # fmt: skip


@pytest.mark.parametrize(
    "result",
    [
        ConversionRecord(
            7, "a", "b", "m1", "m2", "CNY", convert_amounts(10, 10_000, 3_000, 150), None, "completed", None, 123
        ),
        ConversionRecord(8, "a", "b", "m1", "m2", "CNY", convert_amounts(1, 7, 3, 0), "q", "reversed", 9, 1),
        _merchant(),
        "CNY-20261206T000000Z",
    ],
)
def test_a_result_decodes_to_an_equal_value_from_canonical_bytes(result: object) -> None:
    stored = outcomes.encode(result)
    assert outcomes.decode(stored) == result
    assert outcomes.encode(outcomes.decode(stored)) == stored  # the same bytes every time
    document = json.loads(stored)
    assert stored == json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_only_registered_types_are_stored_or_decoded() -> None:
    @dataclass(frozen=True)
    class Unregistered:
        value: int

    with pytest.raises(AssertionError, match="not registered"):
        outcomes.encode(Unregistered(1))
    foreign = json.dumps({"type": "os.system", "value": {"command": "true"}}).encode()
    with pytest.raises(ValueError, match="unknown type"):
        outcomes.decode(foreign)
