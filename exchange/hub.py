"""The running hub's shared state: config, database, clock, keys, the writer and the reader threads.

Database work is synchronous SQLAlchemy run off the event loop. Writes go through the process's
one ledger writer (`exchange/store/writer.py`), which commits concurrent requests in batches.
Work that must own its transactions — closing a clearing cycle, pruning nonces — runs on a
maintenance thread of its own, so a long close never holds a batch of conversions hostage.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from exchange.auth import Authenticator, Verified
from exchange.config import HubConfig
from exchange.domain import errors
from exchange.domain.clock import Clock, SystemClock
from exchange.domain.requests import MutationContext
from exchange.store import dialect, mutation, nonces
from exchange.store.checkpoints import WalCheckpointer
from exchange.store.engine import read_transaction
from exchange.store.writer import Bulk, BulkHandler, LedgerWriter
from merchant_sdk.signing import key_id_of, public_key_bytes

T = TypeVar("T")
VERSION = "0.1.0"
# A bulk handler (`mutation.together`) and this write's payload for it.
Together = tuple[BulkHandler, Any]
# One write: its context, its effect run alone, and how it runs together with its kind, if it can.
Write = tuple[MutationContext, Callable[[Connection], Any], Together | None]
log = logging.getLogger("pointsx.hub")


def _apply_in(conn: Connection, *, ctx: MutationContext, effect: Callable[[Connection], Any]) -> Any:
    return mutation.apply(conn, ctx, effect)


def _storage_refusal(exc: DBAPIError) -> errors.DomainError | None:
    """A conflict that outlasted the retries is a clean, retryable refusal: nothing was applied
    (the transaction rolled back). Any other database error is a bug and stays one (None)."""
    if mutation.is_retryable(exc):
        log.warning("database conflicts outlasted the retries (%s)", exc.orig)
        return errors.StorageBusy("the database is busy; nothing was applied: retry the request")
    return None


def _all_of(futures: list[Future[T]]) -> Future[None]:
    """A future done when every one of `futures` is (whatever their outcome)."""
    done: Future[None] = Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_more(_future: Future[T]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            done.set_result(None)

    if not futures:
        done.set_result(None)
    for future in futures:
        future.add_done_callback(one_more)
    return done


def _answer(future: Future[Any]) -> Any:
    """A write's result or refusal; a conflict that outlasted its retries becomes STORAGE_BUSY."""
    try:
        return future.result()
    except DBAPIError as exc:
        refusal = _storage_refusal(exc)
        if refusal is None:
            raise
        return refusal


async def _storage_safe(work: Awaitable[T]) -> T:
    try:
        return await work
    except DBAPIError as exc:
        refusal = _storage_refusal(exc)
        if refusal is None:
            raise
        raise refusal from exc


class Hub:
    def __init__(
        self, config: HubConfig, engine: Engine, hub_key: Ed25519PrivateKey, clock: Clock | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.hub_key = hub_key
        self.hub_public_key = public_key_bytes(hub_key.public_key())
        self.hub_key_id = key_id_of(self.hub_public_key)
        self.clock: Clock = clock or SystemClock()
        self.authenticator = Authenticator(engine, self.clock, config.auth_window_s)
        self.writer = LedgerWriter(engine, max_batch=config.write_batch_max)
        self._maintenance = ThreadPoolExecutor(1, thread_name_prefix="ledger-maintenance")
        self._checkpointer = WalCheckpointer(engine) if dialect.embedded(engine) else None
        self._reader = ThreadPoolExecutor(4, thread_name_prefix="ledger-reader")

    @property
    def accepted_currencies(self) -> frozenset[str]:
        return frozenset(self.config.currencies)

    async def mutate(
        self, ctx: MutationContext, effect: Callable[[Connection], T], together: Together | None = None
    ) -> T:
        """One idempotent write through the group-commit writer: its domain result (or, for a
        request stored before results were, `outcomes.LegacyReply`); raises its refusal."""
        return mutation.outcome((await self.mutate_all([(ctx, effect, together)]))[0])  # type: ignore[no-any-return]

    async def mutate_all(self, items: list[Write]) -> list[Any]:
        """Many independent writes, each with its own outcome, in as few commits as the writer makes.

        A write that names a `Together` (a bulk handler built by `mutation.together`, and what to
        hand it) runs with the other writes of its kind set-based; its `effect` stays the way it
        runs alone, after a conflict or when the bulk run fails.
        """
        futures = [
            self.writer.submit(
                functools.partial(_apply_in, ctx=ctx, effect=effect),
                functools.partial(mutation.run_alone, self.engine, ctx, effect),
                None if together is None else Bulk(together[0], (ctx, together[1])),
            )
            for ctx, effect, together in items
        ]
        try:
            await asyncio.wrap_future(_all_of(futures))  # one wake-up of the event loop for the lot
        except asyncio.CancelledError:  # the caller gave up: what is still queued is dropped unrun
            for future in futures:
                future.cancel()
            raise
        return [_answer(future) for future in futures]

    async def remember_nonce(self, key_id: str, nonce: str, now_ms: int) -> bool:
        """True the first time this key's nonce is seen, committed with the writer's next batch."""
        future = self.writer.submit(
            lambda conn: nonces.remember_in(conn, key_id, nonce, now_ms),
            lambda: nonces.remember(self.engine, key_id, nonce, now_ms),
            Bulk(nonces.remember_many, (key_id, nonce, now_ms)),
        )
        return await asyncio.wrap_future(future)

    async def spend_nonce(self, key_id: str, nonce: str, now_ms: int) -> None:
        """Remember a request's nonce; NONCE_REPLAYED if it was seen before (DESIGN §6)."""
        if not await _storage_safe(self.remember_nonce(key_id, nonce, now_ms)):
            raise nonces.replayed()

    async def authenticate(self, method: str, metadata: Mapping[str, str], raw: bytes) -> Verified:
        """Headers, key and signature on the event loop (an Ed25519 check is tens of microseconds);
        the database only for a key not read in the last second."""
        authenticator = self.authenticator
        credentials = authenticator.credentials(metadata)
        record = authenticator.cached_key(credentials.key_id)
        if record is None:
            record = await self.read(lambda: authenticator.load_key(credentials.key_id))
        return authenticator.check(method, credentials, record, raw)

    async def maintain(self, work: Callable[[], T]) -> T:
        """Work that owns its transactions (clearing, pruning), beside the writer."""
        return await _storage_safe(asyncio.get_running_loop().run_in_executor(self._maintenance, work))

    async def read(self, work: Callable[[], T]) -> T:
        return await _storage_safe(asyncio.get_running_loop().run_in_executor(self._reader, work))

    async def query(self, work: Callable[[Connection, int], T]) -> T:
        """A read in a transaction of its own, given the hub's time now."""
        now_ms = self.clock.now_ms()

        def run() -> T:
            with read_transaction(self.engine) as conn:
                return work(conn, now_ms)

        return await self.read(run)

    def close(self) -> None:
        self.writer.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._maintenance.shutdown(wait=True)
        self._reader.shutdown(wait=True)
