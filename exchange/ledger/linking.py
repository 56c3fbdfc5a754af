"""Linking one person's accounts at several merchants into one network member (DESIGN §3).

Merchant A asks for a one-time code for its member; the member hands it to merchant B, which
redeems it for its own member_ref. Only a hash of the code is stored. A network member holds at
most one account per merchant (a unique key enforces it).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import Connection, insert, select, update

from exchange.domain import errors
from exchange.domain.models import LinkCodeIssued, MemberView
from exchange.ledger import members as members_mod
from exchange.ledger import merchants as merchants_mod
from exchange.store.schema import link_codes, members

# Crockford base32: no I, L, O, U — nothing a person misreads when typing it from a screen.
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_LENGTH = 8
CODE_TTL_MS = 10 * 60 * 1000


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def normalise(code: str) -> str:
    cleaned = code.strip().upper().replace("-", "").replace(" ", "")
    if len(cleaned) != CODE_LENGTH or any(c not in ALPHABET for c in cleaned):
        raise errors.LinkCodeInvalid("a link code is 8 characters of 0-9 and A-Z (no I, L, O, U)")
    return cleaned


def create_code(conn: Connection, merchant_id: str, member_ref: str, now_ms: int) -> LinkCodeIssued:
    members_mod.require(conn, merchant_id, member_ref)
    code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
    expires = now_ms + CODE_TTL_MS
    conn.execute(
        insert(link_codes).values(
            code_sha256=_digest(code),
            merchant_id=merchant_id,
            member_ref=member_ref,
            created_at_ms=now_ms,
            expires_at_ms=expires,
        )
    )
    return LinkCodeIssued(code, expires)


def redeem_code(conn: Connection, merchant_id: str, member_ref: str, code: str, now_ms: int) -> MemberView:
    digest = _digest(normalise(code))
    row = conn.execute(select(link_codes).where(link_codes.c.code_sha256 == digest)).mappings().one_or_none()
    if row is None or row["redeemed_at_ms"] is not None:
        raise errors.LinkCodeInvalid("unknown or already used link code")
    if row["expires_at_ms"] <= now_ms:
        raise errors.LinkCodeExpired("the link code has expired; ask the member for a new one")
    if row["merchant_id"] == merchant_id:
        raise errors.AlreadyLinked("a link code must be redeemed by a different merchant than the one that made it")
    _src_account, src_network, _ = members_mod.require(conn, row["merchant_id"], row["member_ref"])
    _account, own_network, _ = members_mod.require(conn, merchant_id, member_ref)
    if own_network == src_network:
        raise errors.AlreadyLinked(f"member {member_ref} is already linked to this network member")
    if members_mod.linked_merchants(conn, own_network, merchant_id):
        raise errors.AlreadyLinked(f"member {member_ref} is linked elsewhere; unlink it first")
    if merchant_id in members_mod.linked_merchants(conn, src_network, row["merchant_id"]):
        raise errors.AlreadyLinked(f"this network member already has an account at {merchant_id}")
    # Single-use even under concurrency: only the update that sees it unredeemed wins.
    claimed = conn.execute(
        update(link_codes)
        .where(link_codes.c.code_sha256 == digest, link_codes.c.redeemed_at_ms.is_(None))
        .values(redeemed_at_ms=now_ms, redeemed_by=merchant_id)
    ).rowcount
    if claimed != 1:
        raise errors.LinkCodeInvalid("unknown or already used link code")
    conn.execute(
        update(members)
        .where(members.c.merchant_id == merchant_id, members.c.member_ref == member_ref)
        .values(network_member_id=src_network)
    )
    return members_mod.view(conn, merchant_id, member_ref)


def unlink(conn: Connection, merchant_id: str, member_ref: str) -> MemberView:
    """Detach the merchant's own account; the other accounts stay linked to each other."""
    merchants_mod.require_active(conn, merchant_id)
    _account, network, _ = members_mod.require(conn, merchant_id, member_ref)
    if not members_mod.linked_merchants(conn, network, merchant_id):
        raise errors.NotLinked(f"member {member_ref} is not linked to any other merchant")
    conn.execute(
        update(members)
        .where(members.c.merchant_id == merchant_id, members.c.member_ref == member_ref)
        .values(network_member_id=str(uuid.uuid4()))
    )
    return members_mod.view(conn, merchant_id, member_ref)
