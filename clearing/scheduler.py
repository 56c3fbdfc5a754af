"""Scheduled clearing: APScheduler fires the cron of config.toml and each hub closes its cycles.

Every hub process runs the schedule; they do not race. The cutoff is the scheduled minute (the
same in every process), so every process asks for the same cycle; the idempotency key is derived
from the cycle, and the closing transaction holds a per-currency database lock — one closes, the
others find its cycle (clearing/close.py, `close_scheduled_all`).

This module knows only the schedule: what to close, the clock and where the work runs are handed
to `start` (exchange/runtime.py wires them to the running hub).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

log = logging.getLogger("pointsx.clearing")
MINUTE_MS = 60_000

CloseAll = Callable[[int], list[str]]
"""Close every currency's cycle at a cutoff (epoch ms); the cycle ids."""


def scheduled_cutoff(now_ms: int) -> int:
    """Cron fires on whole minutes: the minute it fired for, whatever the process's small delay."""
    return now_ms - now_ms % MINUTE_MS


def start(
    close_all: CloseAll,
    *,
    cron: str,
    now_ms: Callable[[], int],
    run_beside: Callable[[Callable[[], list[str]]], Awaitable[list[str]]],
) -> AsyncIOScheduler:
    """Start `cron` (UTC) inside the running event loop; each firing runs `close_all` at the
    scheduled minute through `run_beside` (off the event loop: the hub's maintenance thread)."""
    scheduler = AsyncIOScheduler(timezone="UTC")

    async def fire() -> None:
        cutoff = scheduled_cutoff(now_ms())
        try:
            closed = await run_beside(lambda: close_all(cutoff))
        except Exception:  # keep the schedule alive; the next run or an operator retries
            log.exception("scheduled clearing at cutoff %d failed", cutoff)
            return
        log.info("scheduled clearing closed %s", ", ".join(closed) or "nothing (no merchants yet)")

    scheduler.add_job(
        fire,
        CronTrigger.from_crontab(cron, timezone="UTC"),
        id="clearing",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=3600,
    )
    scheduler.start()
    return scheduler
