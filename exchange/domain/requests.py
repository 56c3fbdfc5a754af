"""Who asked for a write, what exactly, and when: what every idempotent write carries downward."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MutationContext:
    caller: str
    key_id: str
    signature: str
    method: str
    request_id: str
    content_sha256: str  # hash of the request's content (method + deterministic encoding)
    raw_sha256: str  # hash of the bytes as received (the signed digest)
    now_ms: int
    # The request's (key_id, nonce, seen_at_ms) when it is to be remembered in the same commit as
    # the effect (one writer trip instead of two); None when the hub remembered it already.
    nonce: tuple[str, str, int] | None = None
