"""Opening a hub from a data directory: database checks, bootstrap keys, then serve until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import signal
import time
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from clearing import close, scheduler
from exchange import config as config_mod
from exchange.config import ConfigError, HubConfig
from exchange.domain.clock import Clock, SystemClock
from exchange.hub import Hub
from exchange.ledger import keys
from exchange.rpc.server import TlsFiles, create_server, mark_serving
from exchange.store import dialect, migrate, mutation, nonces
from exchange.store.engine import make_engine, write_transaction
from merchant_sdk.signing import public_key_bytes

log = logging.getLogger("pointsx.hub")
STARTUP_ATTEMPTS = 10


class MigrationNeeded(ConfigError):
    """The database schema is not at the revision this code expects."""


def ensure_schema(url: str, engine: Engine, *, migrate_now: bool) -> None:
    current, head = migrate.current_revision(engine), migrate.head_revision()
    if current == head:
        return
    if migrate_now or (current is None and dialect.embedded(engine)):
        migrate.upgrade(url)
        return
    raise MigrationNeeded(
        f"database is at schema revision {current or 'none (empty)'}, this hub needs {head}: "
        f"run `pointsx migrate --database-url {engine.url.render_as_string(hide_password=True)}` "
        "(or `pointsx serve --migrate`)"
    )


def open_hub(
    cfg: HubConfig, *, database_url: str | None = None, migrate_now: bool = False, clock: Clock | None = None
) -> Hub:
    url = database_url or cfg.effective_database_url
    engine = make_engine(url)
    hub_key = config_mod.load_key(cfg.hub_key_path)
    operator_public = public_key_bytes(config_mod.load_key(cfg.operator_key_path).public_key())
    now = (clock or SystemClock()).now_ms()

    def bootstrap() -> None:
        ensure_schema(url, engine, migrate_now=migrate_now)
        with write_transaction(engine) as conn:
            keys.ensure(conn, "operator", operator_public, now)

    _through_conflicts(bootstrap)
    return Hub(cfg, engine, hub_key, clock)


def _through_conflicts(work: Callable[[], None], attempts: int = STARTUP_ATTEMPTS) -> None:
    """Start up through transient database conflicts (another hub starting, a busy SQLite), bounded."""
    for attempt in range(1, attempts + 1):
        try:
            work()
            return
        except DBAPIError as exc:
            if attempt == attempts or not mutation.is_retryable(exc):
                raise
            log.warning("database conflict at startup (%s); retrying", exc.orig)
            time.sleep(min(1.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))


async def _prune_nonces(hub: Hub) -> None:
    while True:
        await asyncio.sleep(60)
        cutoff = hub.clock.now_ms() - 2 * hub.config.auth_window_s * 1000
        removed = await hub.maintain(functools.partial(nonces.prune, hub.engine, cutoff))
        log.debug("pruned %d expired nonces", removed)


def close_all_for(hub: Hub) -> scheduler.CloseAll:
    """The clearing schedule's close for `hub`: every currency's cycle at a cutoff, as the scheduler,
    signed with the hub's key and stamped by its clock."""

    def close_all(cutoff_ms: int) -> list[str]:
        signing = close.Signing(network=hub.config.network_name, hub_key=hub.hub_key, hub_key_id=hub.hub_key_id)
        return close.close_scheduled_all(hub.engine, signing, cutoff_ms, now_ms=hub.clock.now_ms)

    return close_all


async def serve(
    hub: Hub,
    listen: str,
    *,
    tls: TlsFiles | None = None,
    allow_insecure: bool = False,
    ready: asyncio.Event | None = None,
    worker: tuple[int, int] | None = None,
    freeze_heap: bool = False,
) -> None:
    """Serve until SIGINT/SIGTERM. As worker (i, n) of `pointsx serve --workers n`, share the port
    with the other workers (SO_REUSEPORT); only worker 0 runs the clearing schedule and pruning.
    `freeze_heap` is for a process that is only this hub (`pointsx serve`), not a test's or an app's."""
    server, port = create_server(hub, listen, tls=tls, allow_insecure=allow_insecure, reuse_port=worker is not None)
    await server.start()
    await mark_serving(server)
    log.info("pointsx hub %r serving on %s (port %d)", hub.config.network_name, listen, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    runner = worker is None or worker[0] == 0
    pruner = asyncio.create_task(_prune_nonces(hub)) if runner else None
    clearing_schedule = (
        scheduler.start(
            close_all_for(hub), cron=hub.config.clearing_cron, now_ms=hub.clock.now_ms, run_beside=hub.maintain
        )
        if runner
        else None
    )
    if runner:
        log.info("clearing scheduled by cron %r (UTC)", hub.config.clearing_cron)
    if freeze_heap:
        # What exists now (modules, the server, the hub) lives as long as the process: out of the
        # collector's sight, the full collections that request traffic triggers every few seconds
        # scan only what requests made — 2 ms of pause instead of 40-50 ms each time.
        gc.freeze()
    if ready is not None:
        ready.set()
    who = "" if worker is None else f" (worker {worker[0] + 1} of {worker[1]})"
    print(f"pointsx hub serving on {listen.rsplit(':', 1)[0]}:{port}{who}", flush=True)
    try:
        await stop.wait()
    finally:
        if pruner is not None:
            pruner.cancel()
        if clearing_schedule is not None:
            clearing_schedule.shutdown(wait=False)
        log.info("shutting down: finishing calls in flight")
        await server.stop(grace=5)
        hub.close()
        hub.engine.dispose()
