"""Scheduled clearing: APScheduler fires the cron of config.toml and each hub closes its cycles.

Every hub process runs the schedule; they do not race. The cutoff is the scheduled minute (the
same in every process), so every process asks for the same cycle; the idempotency key is derived
from the cycle, and the closing transaction holds a per-currency database lock — one closes, the
others find its cycle.
"""

from __future__ import annotations

import hashlib
import logging
import uuid

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Connection, distinct, select

from clearing.close import Signing, close_cycle, cycle_id_for
from exchange.hub import Hub
from exchange.store.mutation import MutationContext, run_mutation
from exchange.store.schema import merchants

log = logging.getLogger("pointsx.clearing")
SCHEDULER_CALLER = "scheduler"
CLOSE_METHOD = "/pointsx.v1.OperatorService/CloseCycle"
MINUTE_MS = 60_000


def scheduled_cutoff(now_ms: int) -> int:
    """Cron fires on whole minutes: the minute it fired for, whatever the process's small delay."""
    return now_ms - now_ms % MINUTE_MS


def currencies_in_use(conn: Connection) -> list[str]:
    return sorted(conn.execute(select(distinct(merchants.c.currency))).scalars())


def close_one(hub: Hub, currency: str, cutoff_ms: int) -> str:
    """Close one currency's cycle as the scheduler: idempotent by a key derived from the cycle."""
    signing = Signing(network=hub.config.network_name, hub_key=hub.hub_key, hub_key_id=hub.hub_key_id)
    cycle_id = cycle_id_for(currency, cutoff_ms)
    digest = hashlib.sha256(f"{CLOSE_METHOD}\n{currency}\n{cutoff_ms}".encode()).hexdigest()
    now_ms = hub.clock.now_ms()
    ctx = MutationContext(
        caller=SCHEDULER_CALLER,
        key_id=hub.hub_key_id,
        signature="",
        method=CLOSE_METHOD,
        request_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"pointsx:{hub.config.network_name}:{cycle_id}")),
        content_sha256=digest,
        raw_sha256=digest,
        now_ms=now_ms,
    )

    def effect(conn: Connection) -> bytes:
        return close_cycle(conn, currency=currency, cutoff_ms=cutoff_ms, now_ms=now_ms, signing=signing).encode()

    return run_mutation(hub.engine, ctx, effect).decode()


def close_all(hub: Hub, cutoff_ms: int) -> list[str]:
    """Close every currency's cycle at `cutoff_ms`; returns the cycle ids."""
    with hub.engine.connect() as conn:
        currencies = currencies_in_use(conn)
    return [close_one(hub, currency, cutoff_ms) for currency in currencies]


def start(hub: Hub) -> AsyncIOScheduler:
    """Start the cron inside the running event loop; the close itself runs on the maintenance thread."""
    scheduler = AsyncIOScheduler(timezone="UTC")

    async def fire() -> None:
        cutoff = scheduled_cutoff(hub.clock.now_ms())
        try:
            closed = await hub.maintain(lambda: close_all(hub, cutoff))
        except Exception:  # keep the schedule alive; the next run or an operator retries
            log.exception("scheduled clearing at cutoff %d failed", cutoff)
            return
        log.info("scheduled clearing closed %s", ", ".join(closed) or "nothing (no merchants yet)")

    scheduler.add_job(
        fire,
        CronTrigger.from_crontab(hub.config.clearing_cron, timezone="UTC"),
        id="clearing",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=3600,
    )
    scheduler.start()
    return scheduler
