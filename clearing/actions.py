"""What happens to a closed cycle afterwards: merchants acknowledge or dispute, the operator settles.

A closed cycle's figures never change (DESIGN §5, finality): these only record facts about it —
an acknowledgement (the merchant's own signature over the exact bytes the hub signed), a dispute
of one item, and the settlement with its bank reference, which posts each settlement against the
network's settlement account.
"""

from __future__ import annotations

import uuid

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from clearing import items as items_mod
from clearing import netting, statement, views
from exchange.domain import errors
from exchange.domain.units import format_operation_id
from exchange.ledger import accounts
from exchange.store.schema import caller_keys, cycle_positions, cycles, disputes, merchants, statements


def acknowledge(
    conn: Connection, merchant_id: str, cycle_id: str, key_id: str, signature: bytes, now_ms: int
) -> tuple[str, int]:
    """Store the merchant's signature over the signed statement bytes; (key_id, when) of the acknowledgement."""
    row = conn.execute(
        select(statements.c.statement_json, statements.c.ack_key_id, statements.c.acked_at_ms).where(
            statements.c.cycle_id == cycle_id, statements.c.merchant_id == merchant_id
        )
    ).one_or_none()
    if row is None:
        raise errors.StatementNotFound(f"{merchant_id} has no statement in cycle {cycle_id}", cycle_id=cycle_id)
    key = conn.execute(
        select(caller_keys.c.public_key, caller_keys.c.status).where(
            caller_keys.c.key_id == key_id, caller_keys.c.caller == merchant_id
        )
    ).one_or_none()
    if key is None:
        raise errors.KeyNotFound(f"{merchant_id} has no key {key_id}", key_id=key_id)
    if key.status != "active":
        raise errors.KeyRevoked(f"key {key_id} is revoked", key_id=key_id)
    if not statement.verify(
        Ed25519PublicKey.from_public_bytes(bytes(key.public_key)), bytes(row.statement_json), signature
    ):
        raise errors.BadStatementSignature(
            f"the signature does not verify with key {key_id} over the statement of cycle {cycle_id}",
            cycle_id=cycle_id,
        )
    if row.acked_at_ms is not None:
        return str(row.ack_key_id), int(row.acked_at_ms)  # the first acknowledgement stands
    conn.execute(
        update(statements)
        .where(statements.c.cycle_id == cycle_id, statements.c.merchant_id == merchant_id)
        .values(ack_key_id=key_id, ack_signature=signature, acked_at_ms=now_ms)
    )
    return key_id, now_ms


def dispute(
    conn: Connection, merchant_id: str, cycle_id: str, operation_seq: int, reason: str, now_ms: int
) -> views.DisputeView:
    views.signed_statement(conn, merchant_id, cycle_id)  # the merchant has a statement in that cycle
    item = items_mod.items(views.cycle_window(conn, cycle_id), merchant_id=merchant_id, after_seq=operation_seq - 1)
    found = conn.execute(select(item.c.operation_seq).where(item.c.operation_seq == operation_seq)).first()
    if found is None:
        operation_id = format_operation_id(operation_seq)
        raise errors.ItemNotInStatement(
            f"{operation_id} is not an item of {merchant_id}'s statement for {cycle_id}", operation_id=operation_id
        )
    record = views.DisputeView(str(uuid.uuid4()), cycle_id, merchant_id, operation_seq, reason, "open", now_ms)
    savepoint = conn.begin_nested()
    try:
        conn.execute(
            insert(disputes).values(
                dispute_id=record.dispute_id,
                cycle_id=cycle_id,
                merchant_id=merchant_id,
                operation_seq=operation_seq,
                reason=reason,
                status="open",
                created_at_ms=now_ms,
            )
        )
    except IntegrityError:
        savepoint.rollback()
        raise errors.DisputeExists(
            f"{merchant_id} already disputes {format_operation_id(operation_seq)} in {cycle_id}"
        ) from None
    savepoint.commit()
    return record


def mark_settled(
    conn: Connection, *, caller: str, request_id: str, cycle_id: str, bank_reference: str, now_ms: int
) -> None:
    """Record the bank transfer and post each settlement: clearing accounts move to the settlement account."""
    row = conn.execute(select(cycles.c.status, cycles.c.currency).where(cycles.c.cycle_id == cycle_id)).one_or_none()
    if row is None:
        raise errors.CycleNotFound(f"cycle {cycle_id} does not exist", cycle_id=cycle_id)
    if row.status != "closed":
        raise errors.CycleAlreadySettled(f"cycle {cycle_id} is already settled", cycle_id=cycle_id)
    step = netting.micros_per_minor(row.currency)
    cash = accounts.cash_asset(row.currency)
    settlement_account = accounts.get_or_create_account(conn, cash, "settlement")
    platform_account = accounts.get_or_create_account(conn, cash, "platform")
    seq = accounts.record_operation(
        conn, kind="settlement", caller=caller, request_id=request_id, merchant_id=netting.PLATFORM,
        member_ref=None, points=0, now_ms=now_ms, memo=f"settlement of {cycle_id}: {bank_reference}"[:200],
    )  # fmt: skip
    clearing_accounts: dict[str, int] = {
        m: int(a) for m, a in conn.execute(select(merchants.c.merchant_id, merchants.c.clearing_account_id))
    }
    for merchant_id, minor in conn.execute(
        select(cycle_positions.c.merchant_id, cycle_positions.c.settlement_minor)
        .where(cycle_positions.c.cycle_id == cycle_id, cycle_positions.c.settlement_minor != 0)
        .order_by(cycle_positions.c.merchant_id)
    ):
        account = platform_account if merchant_id == netting.PLATFORM else clearing_accounts[merchant_id]
        amount = int(minor) * step
        # Paid out: what the network owed the account is discharged; collected: the reverse.
        if amount > 0:
            accounts.post(conn, seq, cash, account, settlement_account, amount)
        else:
            accounts.post(conn, seq, cash, settlement_account, account, -amount)
    conn.execute(
        update(cycles)
        .where(cycles.c.cycle_id == cycle_id)
        .values(status="settled", settled_at_ms=now_ms, bank_reference=bank_reference, settlement_operation_seq=seq)
    )
