"""Open-cycle net positions and the net debit cap (DESIGN §4).

D gives members value before S has paid, so S's open position may not fall below minus its cap.
The check is one guarded UPDATE against the cap as stored: racing conversions serialise on the
row and the second sees the first's amount, so no interleaving overruns the cap.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, select, update

from exchange.domain.refusals import cap_exceeded
from exchange.store.schema import merchant_positions, merchants

# Built once (hot path): statement building and cache keys cost more than the database's work.
_CAP = select(merchants.c.net_debit_cap_micros).where(merchants.c.merchant_id == bindparam("m")).scalar_subquery()
_TAKE = (
    update(merchant_positions)
    .where(
        merchant_positions.c.merchant_id == bindparam("m"),
        merchant_positions.c.open_net_micros - bindparam("amount") >= -_CAP,
    )
    .values(open_net_micros=merchant_positions.c.open_net_micros - bindparam("amount"))
    .returning(merchant_positions.c.open_net_micros)
)
_ADD = (
    update(merchant_positions)
    .where(merchant_positions.c.merchant_id == bindparam("m"))
    .values(open_net_micros=merchant_positions.c.open_net_micros + bindparam("delta"))
)


def take_payable(conn: Connection, merchant_id: str, amount_micros: int) -> int:
    """Lower the position by `amount_micros` if the cap allows; returns the new position."""
    new_position = conn.execute(_TAKE, {"m": merchant_id, "amount": amount_micros}).scalar_one_or_none()
    if new_position is None:
        position, cap_micros = conn.execute(
            select(merchant_positions.c.open_net_micros, merchants.c.net_debit_cap_micros)
            .join(merchants, merchants.c.merchant_id == merchant_positions.c.merchant_id)
            .where(merchant_positions.c.merchant_id == merchant_id)
        ).one()
        raise cap_exceeded(merchant_id, int(position), int(cap_micros), amount_micros)
    return int(new_position)


def add(conn: Connection, merchant_id: str, delta_micros: int) -> None:
    conn.execute(_ADD, {"m": merchant_id, "delta": delta_micros})


def of(conn: Connection, merchant_id: str) -> int:
    return int(
        conn.execute(
            select(merchant_positions.c.open_net_micros).where(merchant_positions.c.merchant_id == merchant_id)
        ).scalar_one()
    )
