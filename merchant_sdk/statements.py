"""Checking a settlement statement before trusting it (DESIGN §5).

A merchant pays what its statement says, so it verifies, with nothing but the hub's published
key: the hub's Ed25519 signature over b"pointsx-statement-v1\\n" + statement_json, and — given the
items from ListStatementItems — that they hash to the statement's `items_sha256`. Deliberately
independent of the hub's own code: it is the merchant's check on the hub.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from merchant_sdk._pb.pointsx.v1 import clearing_pb2

SIGNING_PREFIX = b"pointsx-statement-v1\n"


class StatementVerificationError(Exception):
    """The statement is not what the hub signed, or its items are not the ones it summarises."""


@dataclass(frozen=True)
class VerifiedStatement:
    """The statement's fields, parsed after its signature (and items, if given) checked out."""

    fields: dict[str, Any]
    items_checked: bool

    @property
    def cycle_id(self) -> str:
        return str(self.fields["cycle_id"])


def items_sha256(items: Iterable[clearing_pb2.StatementItem]) -> str:
    lines = sorted(
        (i.operation_id, f"{i.operation_id},{i.direction},{i.counterparty},{i.points},{i.cash_micros}\n") for i in items
    )
    digest = hashlib.sha256()
    for _op, line in lines:
        digest.update(line.encode())
    return digest.hexdigest()


def verify_statement(
    envelope: clearing_pb2.StatementEnvelope,
    hub_keys: Mapping[str, bytes],
    items: Iterable[clearing_pb2.StatementItem] | None = None,
) -> VerifiedStatement:
    """Raise StatementVerificationError unless the hub's key `envelope.key_id` signed these bytes.

    `hub_keys` maps key id -> raw 32-byte public key (from GetNetworkInfo's hub_keys).
    """
    raw_key = hub_keys.get(envelope.key_id)
    if raw_key is None:
        raise StatementVerificationError(f"statement signed with unknown hub key {envelope.key_id!r}")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(raw_key)).verify(
            bytes(envelope.signature), SIGNING_PREFIX + bytes(envelope.statement_json)
        )
    except (InvalidSignature, ValueError):
        raise StatementVerificationError("the hub's signature does not verify over the statement") from None
    fields = json.loads(bytes(envelope.statement_json).decode("utf-8"))
    if fields.get("hub_key_id") != envelope.key_id:
        raise StatementVerificationError("the statement names another hub key than the one that signed it")
    if items is None:
        return VerifiedStatement(fields, False)
    listed = list(items)
    if len(listed) != int(fields["item_count"]):
        raise StatementVerificationError(f"{len(listed)} items listed, the statement counts {fields['item_count']}")
    if items_sha256(listed) != fields["items_sha256"]:
        raise StatementVerificationError("the listed items do not hash to the statement's items_sha256")
    return VerifiedStatement(fields, True)


def acknowledgement_signature(private_key: Ed25519PrivateKey, statement_json: bytes) -> bytes:
    """The merchant's signature over the same bytes the hub signed."""
    return private_key.sign(SIGNING_PREFIX + statement_json)
