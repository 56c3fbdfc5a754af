"""Request signing (DESIGN §6). The hub imports `auth_payload` too, so both sides never drift.

A signature covers the exact request bytes sent, the method path, the caller and key, a
millisecond timestamp and a random nonce — so a captured request can be neither altered nor
replayed outside a 300 s window.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

AUTH_DOMAIN = b"pointsx-v1"
HEADER_CALLER = "x-pointsx-caller"
HEADER_KEY_ID = "x-pointsx-key-id"
HEADER_TIMESTAMP = "x-pointsx-timestamp"
HEADER_NONCE = "x-pointsx-nonce"
HEADER_SIGNATURE = "x-pointsx-signature"


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(public_key: bytes | Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 of the raw 32-byte public key."""
    raw = public_key if isinstance(public_key, bytes) else public_key_bytes(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]


def auth_payload(method: str, caller: str, key_id: str, timestamp_ms: str, nonce: str, body: bytes) -> bytes:
    """The exact bytes a caller signs: `pointsx-v1\\n<method>\\n<caller>\\n<key>\\n<ts>\\n<nonce>\\n<sha256 hex>`."""
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join(["pointsx-v1", method, caller, key_id, timestamp_ms, nonce, digest]).encode()


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the key is not an Ed25519 private key")
    return key


def load_private_key_file(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    return load_private_key(Path(path).read_bytes())


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class Signer:
    """Holds one caller's private key and produces the auth metadata for each call."""

    def __init__(self, caller: str, private_key: Ed25519PrivateKey) -> None:
        self.caller = caller
        self.private_key = private_key
        self.public_key = public_key_bytes(private_key.public_key())
        self.key_id = key_id_of(self.public_key)

    def metadata(self, method: str, body: bytes, *, now_ms: int | None = None) -> list[tuple[str, str]]:
        """Fresh timestamp and nonce every time: a retry is a new signature over the same body."""
        timestamp = str(int(time.time() * 1000) if now_ms is None else now_ms)
        nonce = secrets.token_hex(16)
        payload = auth_payload(method, self.caller, self.key_id, timestamp, nonce, body)
        signature = base64.b64encode(self.private_key.sign(payload)).decode()
        return [
            (HEADER_CALLER, self.caller),
            (HEADER_KEY_ID, self.key_id),
            (HEADER_TIMESTAMP, timestamp),
            (HEADER_NONCE, nonce),
            (HEADER_SIGNATURE, signature),
        ]
