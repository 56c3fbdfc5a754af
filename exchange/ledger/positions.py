"""Open-cycle net positions (DESIGN §4): what a reversal moves back and what clearing reads.

The net debit cap itself is checked by the conversion engine (exchange/domain/decider.py) on the
positions the store read under their row locks (exchange/ledger/conversion_store.py).
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select, update

from exchange.store.schema import merchant_positions

# Built once (hot path): statement building and cache keys cost more than the database's work.
_ADD = (
    update(merchant_positions)
    .where(merchant_positions.c.merchant_id == bindparam("m"))
    .values(open_net_micros=merchant_positions.c.open_net_micros + bindparam("delta"))
)


def add(conn: Connection, merchant_id: str, delta_micros: int) -> None:
    conn.execute(_ADD, {"m": merchant_id, "delta": delta_micros})


def of(conn: Connection, merchant_id: str) -> int:
    return int(
        conn.execute(
            select(merchant_positions.c.open_net_micros).where(merchant_positions.c.merchant_id == merchant_id)
        ).scalar_one()
    )
