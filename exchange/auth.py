"""Request authentication exactly as DESIGN §6, over the raw bytes the hub received.

Order of checks: well-formed headers, timestamp window, known active key of that caller, the
signature, and only then the nonce — so an attacker without the key cannot burn nonces.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from sqlalchemy import Engine

from exchange.domain import errors
from exchange.domain.clock import Clock
from exchange.domain.keys import raw_public_key
from exchange.domain.models import KeyRecord
from exchange.ledger import keys
from exchange.store.engine import read_transaction
from merchant_sdk import signing

_NONCE = re.compile(r"^[0-9a-f]{32}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")
_TIMESTAMP = re.compile(r"^[0-9]{1,15}$")


@dataclass(frozen=True)
class Identity:
    caller: str  # a merchant id, or "operator"
    key_id: str
    signature: str  # base64, as received (kept for the audit log)


@dataclass(frozen=True)
class Verified:
    """A signature that verified; its nonce still has to be remembered before the call may run."""

    identity: Identity
    nonce: str
    at_ms: int


@dataclass(frozen=True)
class Credentials:
    """The x-pointsx-* headers of one call, well-formed and inside the timestamp window."""

    caller: str
    key_id: str
    timestamp: str
    nonce: str
    signature_b64: str
    signature: bytes
    at_ms: int


# How long a key read from the database is trusted without reading it again. A key revoked through
# this hub process is forgotten at once (`forget`); one revoked through another process of the same
# network stops working here within this time.
KEY_CACHE_S = 1.0


class Authenticator:
    def __init__(self, engine: Engine, clock: Clock, window_s: int) -> None:
        self.engine = engine
        self.clock = clock
        self.window_ms = window_s * 1000
        self._keys: dict[str, tuple[KeyRecord, float]] = {}

    def credentials(self, metadata: Mapping[str, str]) -> Credentials:
        """Well-formed headers and a timestamp in the window, or the Unauthenticated refusal."""
        values = [
            metadata.get(h)
            for h in (
                signing.HEADER_CALLER,
                signing.HEADER_KEY_ID,
                signing.HEADER_TIMESTAMP,
                signing.HEADER_NONCE,
                signing.HEADER_SIGNATURE,
            )
        ]
        if any(v is None for v in values):
            raise errors.MissingCredentials("call is not signed: x-pointsx-* metadata is missing")
        caller, key_id, timestamp, nonce, signature_b64 = (str(v) for v in values)
        if (
            not _KEY_ID.fullmatch(key_id)
            or not _NONCE.fullmatch(nonce)
            or not _TIMESTAMP.fullmatch(timestamp)
            or not caller
            or len(caller) > 63
        ):
            raise errors.MalformedCredentials("malformed x-pointsx-* metadata")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except (binascii.Error, ValueError):
            raise errors.MalformedCredentials("x-pointsx-signature is not standard base64") from None
        if len(signature) != 64:
            raise errors.MalformedCredentials("x-pointsx-signature must encode 64 bytes")
        now_ms = self.clock.now_ms()
        if abs(now_ms - int(timestamp)) > self.window_ms:
            raise errors.TimestampOutOfWindow(f"timestamp is more than {self.window_ms // 1000} s from the hub's clock")
        return Credentials(caller, key_id, timestamp, nonce, signature_b64, signature, now_ms)

    def cached_key(self, key_id: str) -> KeyRecord | None:
        """The key as read less than KEY_CACHE_S ago, if it was."""
        cached = self._keys.get(key_id)
        if cached is None or time.monotonic() - cached[1] > KEY_CACHE_S:
            return None
        return cached[0]

    def load_key(self, key_id: str) -> KeyRecord | None:
        """Read the key from the database (a worker thread's job) and cache what was found."""
        with read_transaction(self.engine) as conn:
            record = keys.find(conn, key_id)
        if record is not None:
            self._keys[key_id] = (record, time.monotonic())
        return record

    def forget(self, key_id: str) -> None:
        """After a change to the key (revoked) is committed: the next call reads it again."""
        self._keys.pop(key_id, None)

    def check(self, method: str, credentials: Credentials, record: KeyRecord | None, body: bytes) -> Verified:
        """The key belongs to the caller and is active, and the signature verifies over these bytes.

        The nonce is not remembered here: the caller stores it through the writer (`Hub.remember_nonce`,
        or in the commit of the call's own write) and refuses a replay, only once the signature has
        verified — so an attacker without the key cannot burn nonces.
        """
        c = credentials
        if record is None or record.caller != c.caller:
            raise errors.UnknownKey(f"key {c.key_id} is not registered for {c.caller[:63]}")
        if record.status != "active":
            raise errors.KeyRevoked(f"key {c.key_id} was revoked")
        payload = signing.auth_payload(method, c.caller, c.key_id, c.timestamp, c.nonce, body)
        try:
            raw_public_key(record.public_key).verify(c.signature, payload)
        except InvalidSignature:
            raise errors.BadSignature("signature does not verify over this request") from None
        return Verified(Identity(caller=c.caller, key_id=c.key_id, signature=c.signature_b64), c.nonce, c.at_ms)
