"""The hash-chained audit log (DESIGN §6): who changed what, with the signature that proves it.

Each record's hash covers its fields and the previous record's hash, so removing, reordering or
editing any record breaks every hash after it; `pointsx audit verify` walks the chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

from sqlalchemy import Connection, Engine, select

from exchange.store import bulk
from exchange.store.schema import audit_head, audit_log

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    at_ms: int
    caller: str
    key_id: str
    signature: str
    method: str
    request_id: str
    request_sha256: str
    response_sha256: str

    def fields(self) -> dict[str, object]:
        """The record's fields by name (what `dataclasses.asdict` gives, without its deep copies)."""
        return {name: getattr(self, name) for name in _ENTRY_FIELDS}


_ENTRY_FIELDS = tuple(f.name for f in dataclass_fields(AuditEntry))


def record_hash(seq: int, prev_hash: str, entry: AuditEntry) -> str:
    body = json.dumps({"seq": seq, "prev_hash": prev_hash, **entry.fields()}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


_HEAD = select(audit_head.c.seq, audit_head.c.record_hash).where(audit_head.c.id == 1).with_for_update()
_ADVANCE = "UPDATE audit_head SET seq = :{p}seq, record_hash = :{p}record_hash WHERE id = 1"


def append(conn: Connection, entry: AuditEntry) -> int:
    """Lock the head row (FOR UPDATE; SQLite's write lock already serialises), chain, advance."""
    return append_many(conn, [entry])[0]


def append_many(conn: Connection, entries: list[AuditEntry]) -> list[int]:
    """Chain many records under one lock of the head: one read, one insert, one advance.

    A batch's records are chained in Python and written together, so the head — the one row
    every write takes — is held for three statements per batch rather than three per request.
    """
    if not entries:
        return []
    head = conn.execute(_HEAD).one()
    seq, prev_hash = int(head.seq), str(head.record_hash)
    rows, seqs = [], []
    for entry in entries:
        seq += 1
        digest = record_hash(seq, prev_hash, entry)
        rows.append({"seq": seq, "prev_hash": prev_hash, "record_hash": digest, **entry.fields()})
        seqs.append(seq)
        prev_hash = digest
    bulk.insert_rows(conn, audit_log, rows)
    bulk.later(conn, _ADVANCE, {"seq": seq, "record_hash": prev_hash})
    return seqs


@dataclass(frozen=True)
class VerifyReport:
    records: int
    first_broken_seq: int | None
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.first_broken_seq is None


def _rows(engine: Engine, batch: int = 5000) -> Iterator[dict[str, object]]:
    after = 0
    while True:
        with engine.connect() as conn:
            rows = (
                conn.execute(select(audit_log).where(audit_log.c.seq > after).order_by(audit_log.c.seq).limit(batch))
                .mappings()
                .all()
            )
        if not rows:
            return
        for row in rows:
            yield dict(row)
        after = int(rows[-1]["seq"])  # type: ignore[call-overload]


def verify(engine: Engine) -> VerifyReport:
    """Walk the chain in order; report the first record whose link or hash does not hold."""
    prev_hash, expected_seq, count = GENESIS, 1, 0
    for row in _rows(engine):
        seq = int(row["seq"])  # type: ignore[call-overload]
        if seq != expected_seq:
            return VerifyReport(count, expected_seq, f"record {expected_seq} is missing (next is {seq})")
        if row["prev_hash"] != prev_hash:
            return VerifyReport(count, seq, "prev_hash does not match the previous record's hash")
        entry = AuditEntry(**{k: row[k] for k in AuditEntry.__dataclass_fields__})  # type: ignore[arg-type]
        if record_hash(seq, prev_hash, entry) != row["record_hash"]:
            return VerifyReport(count, seq, "record_hash does not match the record's content")
        prev_hash, expected_seq, count = str(row["record_hash"]), seq + 1, count + 1
    with engine.connect() as conn:
        head = conn.execute(select(audit_head.c.seq, audit_head.c.record_hash)).one()
    if head.seq != count or head.record_hash != prev_hash:
        return VerifyReport(count, count + 1, f"the chain head says {head.seq} records; {count} were found")
    return VerifyReport(count, None, None)
