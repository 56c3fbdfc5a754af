"""The clearing fence: once a cycle's window is being cleared, nothing more can land in it.

A cycle of currency C clears the operations of C stamped in [previous cutoff, cutoff). Which
cycle holds an operation is decided by its stamp alone, so closing never rewrites operations
(no per-row `cycle_id` update: a million-conversion cycle closes in seconds). What makes that
sound is this fence. Every writer of a C operation takes a *shared* lock on C's fence and stamps
its operation no earlier than the fence; closing takes the *exclusive* lock, which waits for the
writers in flight, raises the fence to the cutoff and commits before the window is read. So a
writer either committed before the fence rose (and the close sees it) or stamps at or after the
cutoff (and lands in the next window) — whatever its clock says, even on another hub process.

PostgreSQL: transaction-scoped advisory locks, shared for writers and exclusive for the close —
in memory, no row is written per conversion. SQLite has one writer at a time, so the read alone
is enough.
"""

from __future__ import annotations

from sqlalchemy import Connection, bindparam, func, insert, literal, select, update

from exchange.store import dialect
from exchange.store.schema import clearing_fences, merchants


def _lock_key(currency: str) -> str:
    return f"pointsx-fence:{currency}"


_FENCE = select(clearing_fences.c.fenced_before_ms).where(clearing_fences.c.currency == bindparam("currency"))


def fenced_before(conn: Connection, currency: str) -> int:
    """The earliest stamp an operation of `currency` may still take (0: never fenced)."""
    found = conn.execute(_FENCE, {"currency": currency}).scalar_one_or_none()
    return 0 if found is None else int(found)


def stamp(conn: Connection, currency: str, now_ms: int) -> int:
    """The clearing stamp of an operation of `currency` written now, in this transaction.

    The shared lock is held to commit, so a close waits for this operation before it reads.
    """
    return max(now_ms, hold(conn, currency))


# The same protocol for the currencies of a set of merchants, as statements to send in one go
# (`dialect.read_all`): the shared locks first (PostgreSQL only; sorted), then — a later statement,
# so it sees a fence raised by a close that committed while it waited — the fences themselves.
_CURRENCIES = (
    select(merchants.c.currency)
    .where(merchants.c.merchant_id.in_(bindparam("ids", expanding=True)))
    .distinct()
    .order_by(merchants.c.currency)
    .subquery()
)
HOLD_FOR_MERCHANTS = select(
    func.pg_advisory_xact_lock_shared(func.hashtext(literal("pointsx-fence:") + _CURRENCIES.c.currency))
)
FENCES_FOR_MERCHANTS = select(clearing_fences.c.currency, clearing_fences.c.fenced_before_ms).where(
    clearing_fences.c.currency.in_(
        select(merchants.c.currency).where(merchants.c.merchant_id.in_(bindparam("ids", expanding=True)))
    )
)


def hold(conn: Connection, currency: str) -> int:
    """Take the shared lock on `currency`'s fence until commit; the fence as it now stands.

    Every operation of `currency` this transaction writes from now on is stamped no earlier.
    """
    dialect.advisory_lock(conn, _lock_key(currency), shared=True)
    return fenced_before(conn, currency)


def raise_fence(conn: Connection, currency: str, cutoff_ms: int) -> None:
    """Fence `currency` at `cutoff_ms`; commit before reading the window. Never lowers the fence."""
    dialect.advisory_lock(conn, _lock_key(currency))
    current = conn.execute(
        select(clearing_fences.c.fenced_before_ms).where(clearing_fences.c.currency == currency)
    ).scalar_one_or_none()
    if current is None:
        conn.execute(insert(clearing_fences).values(currency=currency, fenced_before_ms=cutoff_ms))
    elif int(current) < cutoff_ms:
        conn.execute(
            update(clearing_fences).where(clearing_fences.c.currency == currency).values(fenced_before_ms=cutoff_ms)
        )
