"""The signed settlement statement (DESIGN §5, normative to the byte).

`statement_json` is UTF-8 JSON with sorted keys and no insignificant whitespace, amounts as
decimal strings of micros. The hub signs b"pointsx-statement-v1\\n" + statement_json with
Ed25519; the bytes are stored and served exactly as signed, never rebuilt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_PREFIX = b"pointsx-statement-v1\n"


def rfc3339(ms: int) -> str:
    """UTC, 'Z', whole seconds unless the instant has milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StatementItem:
    operation_id: str
    direction: str  # "out" or "in"
    counterparty: str
    points: int
    cash_micros: int

    def line(self) -> bytes:
        return f"{self.operation_id},{self.direction},{self.counterparty},{self.points},{self.cash_micros}\n".encode()


def items_sha256(items: Iterable[StatementItem]) -> str:
    """The reference form of `items_sha256` (the hub computes it in SQL; tests hold the two equal)."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.operation_id):
        digest.update(item.line())
    return digest.hexdigest()


@dataclass(frozen=True)
class StatementFacts:
    network: str
    cycle_id: str
    currency: str
    minor_units: int
    period_start_ms: int
    cutoff_ms: int
    merchant: str
    opening_carry: int
    payable: int
    receivable: int
    net: int
    settlement_micros: int
    settlement_minor: int
    closing_carry: int
    counterparties: dict[str, tuple[int, int]]  # partner -> (payable, receivable)
    item_count: int
    items_sha256: str
    hub_key_id: str
    previous_sha256: str


def statement_json(facts: StatementFacts) -> bytes:
    body = {
        "network": facts.network,
        "cycle_id": facts.cycle_id,
        "currency": facts.currency,
        "minor_units": facts.minor_units,
        "period_start": rfc3339(facts.period_start_ms),
        "cutoff": rfc3339(facts.cutoff_ms),
        "merchant": facts.merchant,
        "opening_carry": str(facts.opening_carry),
        "payable": str(facts.payable),
        "receivable": str(facts.receivable),
        "net": str(facts.net),
        "settlement": str(facts.settlement_micros),
        "settlement_minor": str(facts.settlement_minor),
        "closing_carry": str(facts.closing_carry),
        "counterparties": {
            partner: {"payable": str(payable), "receivable": str(receivable)}
            for partner, (payable, receivable) in facts.counterparties.items()
        },
        "item_count": facts.item_count,
        "items_sha256": facts.items_sha256,
        "hub_key_id": facts.hub_key_id,
        "previous_sha256": facts.previous_sha256,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(key: Ed25519PrivateKey, statement: bytes) -> bytes:
    return key.sign(SIGNING_PREFIX + statement)


def verify(public_key: Ed25519PublicKey, statement: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(signature, SIGNING_PREFIX + statement)
    except InvalidSignature:
        return False
    return True
