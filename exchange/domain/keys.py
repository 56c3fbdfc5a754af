"""Ed25519 key handling shared by authentication, key management and the CLI (DESIGN §6)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from exchange.domain import errors
from merchant_sdk.signing import key_id_of, public_key_bytes

__all__ = ["key_id_of", "load_public_key", "public_from_pem", "public_key_bytes", "raw_public_key"]


def raw_public_key(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise errors.InvalidPublicKey(f"public key must be 32 raw Ed25519 bytes, got {len(raw)}")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise errors.InvalidPublicKey(f"not an Ed25519 public key: {exc}") from None


def public_from_pem(pem: bytes) -> bytes:
    """SPKI PEM (or a PKCS#8 private key PEM, whose public half is taken) -> raw 32 bytes."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        try:
            private = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise errors.InvalidPublicKey("not a PEM Ed25519 public key (SPKI) or private key (PKCS#8)") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise errors.InvalidPublicKey("the PEM key is not Ed25519") from None
        return public_key_bytes(private.public_key())
    if not isinstance(key, Ed25519PublicKey):
        raise errors.InvalidPublicKey("the PEM key is not Ed25519")
    return public_key_bytes(key)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    return raw_public_key(raw)
