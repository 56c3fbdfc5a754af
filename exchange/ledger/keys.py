"""Callers' Ed25519 keys: several active at once (rotation), revocable, never the last one."""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, func, insert, select, update

from exchange.domain import errors
from exchange.domain.keys import key_id_of, raw_public_key
from exchange.domain.models import KeyRecord
from exchange.store.schema import caller_keys

MAX_ACTIVE_KEYS = 10


def _record(row: object) -> KeyRecord:
    return KeyRecord(
        key_id=row.key_id,  # type: ignore[attr-defined]
        caller=row.caller,  # type: ignore[attr-defined]
        public_key=bytes(row.public_key),  # type: ignore[attr-defined]
        status=row.status,  # type: ignore[attr-defined]
        created_at_ms=int(row.created_at_ms),  # type: ignore[attr-defined]
        revoked_at_ms=None if row.revoked_at_ms is None else int(row.revoked_at_ms),  # type: ignore[attr-defined]
    )


_FIND = select(caller_keys).where(caller_keys.c.key_id == bindparam("key_id"))  # every request: built once


def find(conn: Connection, key_id: str) -> KeyRecord | None:
    row = conn.execute(_FIND, {"key_id": key_id}).one_or_none()
    return None if row is None else _record(row)


def list_for(conn: Connection, caller: str) -> list[KeyRecord]:
    rows = conn.execute(
        select(caller_keys)
        .where(caller_keys.c.caller == caller)
        .order_by(caller_keys.c.created_at_ms, caller_keys.c.key_id)
    )
    return [_record(r) for r in rows]


def add(conn: Connection, caller: str, public_key: bytes, now_ms: int) -> KeyRecord:
    raw_public_key(public_key)  # refuses anything that is not a valid Ed25519 point
    key_id = key_id_of(public_key)
    existing = find(conn, key_id)
    if existing is not None:
        raise errors.KeyExists(f"key {key_id} is already registered", key_id=key_id)
    active = conn.execute(
        select(func.count())
        .select_from(caller_keys)
        .where(caller_keys.c.caller == caller, caller_keys.c.status == "active")
    ).scalar_one()
    if active >= MAX_ACTIVE_KEYS:
        raise errors.InvalidField(
            f"at most {MAX_ACTIVE_KEYS} active keys per caller; revoke one first", field="public_key"
        )
    conn.execute(
        insert(caller_keys).values(
            key_id=key_id, caller=caller, public_key=public_key, status="active", created_at_ms=now_ms
        )
    )
    found = find(conn, key_id)
    assert found is not None
    return found


def revoke(conn: Connection, caller: str, key_id: str, now_ms: int) -> KeyRecord:
    record = find(conn, key_id)
    if record is None or record.caller != caller:
        raise errors.KeyNotFound(f"key {key_id[:20]} is not one of {caller}'s keys", key_id=key_id[:20])
    if record.status == "revoked":
        raise errors.KeyAlreadyRevoked(f"key {key_id} is already revoked", key_id=key_id)
    others = conn.execute(
        select(func.count())
        .select_from(caller_keys)
        .where(caller_keys.c.caller == caller, caller_keys.c.status == "active", caller_keys.c.key_id != key_id)
    ).scalar_one()
    if others == 0:
        raise errors.LastActiveKey("cannot revoke the last active key: add its replacement first", key_id=key_id)
    conn.execute(
        update(caller_keys).where(caller_keys.c.key_id == key_id).values(status="revoked", revoked_at_ms=now_ms)
    )
    found = find(conn, key_id)
    assert found is not None
    return found


def ensure(conn: Connection, caller: str, public_key: bytes, now_ms: int) -> str:
    """Register a bootstrap key (the operator's, from the data directory) unless it is known."""
    key_id = key_id_of(public_key)
    if find(conn, key_id) is None:
        add(conn, caller, public_key, now_ms)
    return key_id
