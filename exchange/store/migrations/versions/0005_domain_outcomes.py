"""domain outcomes: idempotency records keep the domain result, not the reply's bytes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 04:00:00

From here a write's outcome is stored as its domain result in canonical JSON (`result`,
exchange/domain/outcomes.py), and the RPC edge encodes it, the same way for the first answer and
every replay. Records written before keep their reply bytes in `response` and are replayed from
them unchanged; nothing is rewritten, so a retry of an old request still gets its first answer.
The downgrade keeps nothing of `result`: requests stored that way could not be replayed by the
older hub, so it refuses while any exists.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency") as batch:
        batch.add_column(sa.Column("result", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    stored = op.get_bind().execute(sa.text("SELECT count(*) FROM idempotency WHERE result IS NOT NULL")).scalar_one()
    if stored:
        raise RuntimeError(
            f"{stored} idempotency records hold domain results that the older hub cannot replay; "
            "downgrading would lose their answers"
        )
    with op.batch_alter_table("idempotency") as batch:
        batch.drop_column("result")
