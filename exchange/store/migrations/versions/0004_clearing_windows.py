"""clearing windows: cycles clear a stamped window behind a fence, operations lose cycle_id

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 18:40:00

Until now closing a cycle wrote its id into every operation it cleared, one index-rewriting
UPDATE per operation. From here a cycle clears the operations of its currency stamped in its
window [previous cutoff, cutoff), kept exact by the clearing fence (exchange/store/fences.py).
The upgrade derives each cycle's window, checks that every existing operation's recorded cycle is
the one its window gives — and refuses, naming the operations, if one is not (a conversion that
committed after a close with an earlier stamp) — then drops the column.

The per-counterparty breakdown is no longer a table of its own (a row per pair of merchants, a
million-row insert for a big network's cycle): the signed statements already hold it, and
`clearing.views` reads it from there. The downgrade rebuilds the table from them.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_WINDOW_OF = (
    "(SELECT c.cycle_id FROM cycles c WHERE c.currency = o.currency "
    "AND o.created_at_ms >= c.window_start_ms AND o.created_at_ms < c.cutoff_ms)"
)


def upgrade() -> None:
    op.create_table(
        "clearing_fences",
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("fenced_before_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("currency", name=op.f("pk_clearing_fences")),
    )
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("window_start_ms", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("first_operation_seq", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("last_operation_seq", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE cycles SET window_start_ms = COALESCE((SELECT MAX(p.cutoff_ms) FROM cycles p "
        "WHERE p.currency = cycles.currency AND p.cutoff_ms < cycles.cutoff_ms), 0)"
    )
    op.execute(
        "UPDATE cycles SET first_operation_seq = (SELECT MIN(o.operation_seq) FROM operations o "
        "WHERE o.cycle_id = cycles.cycle_id), last_operation_seq = (SELECT MAX(o.operation_seq) "
        "FROM operations o WHERE o.cycle_id = cycles.cycle_id)"
    )
    op.execute(
        "INSERT INTO clearing_fences (currency, fenced_before_ms) SELECT currency, MAX(cutoff_ms) FROM cycles "
        "GROUP BY currency"
    )
    misplaced = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT o.operation_seq FROM operations o WHERE o.currency IS NOT NULL "
                f"AND COALESCE(o.cycle_id, '') <> COALESCE({_WINDOW_OF}, '') ORDER BY o.operation_seq LIMIT 10"
            )
        )
        .scalars()
        .all()
    )
    if misplaced:
        raise RuntimeError(
            "cannot move clearing to windows: operations "
            + ", ".join(f"op_{seq:016d}" for seq in misplaced)
            + " were cleared in a cycle other than the one their stamp falls in; settle them by hand first"
        )
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.alter_column("window_start_ms", existing_type=sa.BigInteger(), nullable=False)
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index("ix_operations_cycle_seq")
        batch_op.drop_index("ix_operations_clearing")
        batch_op.drop_column("cycle_id")
        batch_op.create_index(
            "ix_operations_reversals",
            ["currency", "created_at_ms"],
            unique=False,
            postgresql_where=sa.text("kind = 'reversal'"),
            sqlite_where=sa.text("kind = 'reversal'"),
        )
    with op.batch_alter_table("conversions", schema=None) as batch_op:
        batch_op.create_index("ix_conversions_clearing", ["currency", "created_at_ms"], unique=False)
    op.drop_table("cycle_counterparties")


def downgrade() -> None:
    breakdown = op.create_table(
        "cycle_counterparties",
        sa.Column("cycle_id", sa.String(length=64), nullable=False),
        sa.Column("merchant_id", sa.String(length=63), nullable=False),
        sa.Column("counterparty_id", sa.String(length=63), nullable=False),
        sa.Column("payable_micros", sa.BigInteger(), nullable=False),
        sa.Column("receivable_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["cycle_id"], ["cycles.cycle_id"], name=op.f("fk_cycle_counterparties_cycle_id_cycles")
        ),
        sa.PrimaryKeyConstraint("cycle_id", "merchant_id", "counterparty_id", name=op.f("pk_cycle_counterparties")),
    )
    signed = op.get_bind().execute(sa.text("SELECT cycle_id, merchant_id, statement_json FROM statements"))
    rows = [
        {
            "cycle_id": cycle_id,
            "merchant_id": merchant_id,
            "counterparty_id": partner,
            "payable_micros": int(amounts["payable"]),
            "receivable_micros": int(amounts["receivable"]),
        }
        for cycle_id, merchant_id, body in signed
        for partner, amounts in json.loads(bytes(body))["counterparties"].items()
    ]
    if rows:
        op.bulk_insert(breakdown, rows)
    with op.batch_alter_table("conversions", schema=None) as batch_op:
        batch_op.drop_index("ix_conversions_clearing")
    with op.batch_alter_table("operations", schema=None) as batch_op:
        batch_op.drop_index("ix_operations_reversals")
        batch_op.add_column(sa.Column("cycle_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_operations_clearing", ["currency", "cycle_id", "created_at_ms"], unique=False)
        batch_op.create_index("ix_operations_cycle_seq", ["cycle_id", "operation_seq"], unique=False)
    op.execute(f"UPDATE operations SET cycle_id = {_WINDOW_OF.replace('o.', 'operations.')} WHERE currency IS NOT NULL")
    with op.batch_alter_table("cycles", schema=None) as batch_op:
        batch_op.drop_column("last_operation_seq")
        batch_op.drop_column("first_operation_seq")
        batch_op.drop_column("window_start_ms")
    op.drop_table("clearing_fences")
