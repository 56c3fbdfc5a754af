"""The running hub's shared state: config, database, clock, keys, the writer and the reader threads.

Database work is synchronous SQLAlchemy run off the event loop. Writes go through the process's
one ledger writer (`exchange/store/writer.py`), which commits concurrent requests in batches.
Work that must own its transactions — closing a clearing cycle, pruning nonces — runs on a
maintenance thread of its own, so a long close never holds a batch of conversions hostage.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine

from exchange.config import HubConfig
from exchange.domain import errors
from exchange.domain.clock import Clock, SystemClock
from exchange.rpc.auth import Authenticator
from exchange.store import mutation, nonces
from exchange.store.checkpoints import WalCheckpointer
from exchange.store.engine import is_sqlite
from exchange.store.mutation import MutationContext
from exchange.store.writer import Bulk, BulkHandler, LedgerWriter
from merchant_sdk.signing import key_id_of, public_key_bytes

T = TypeVar("T")
VERSION = "0.1.0"
# A bulk handler (`mutation.together`) and this write's payload for it.
Together = tuple[BulkHandler, Any]
# One write: its context, its effect run alone, and how it runs together with its kind, if it can.
Write = tuple[MutationContext, Callable[[Connection], bytes], Together | None]


def _apply_in(
    conn: Connection, *, ctx: MutationContext, effect: Callable[[Connection], bytes]
) -> bytes | errors.DomainError:
    return mutation.apply(conn, ctx, effect)


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
        self._checkpointer = WalCheckpointer(engine) if is_sqlite(engine) else None
        self._reader = ThreadPoolExecutor(4, thread_name_prefix="ledger-reader")

    @property
    def accepted_currencies(self) -> frozenset[str]:
        return frozenset(self.config.currencies)

    async def mutate(
        self, ctx: MutationContext, effect: Callable[[Connection], bytes], together: Together | None = None
    ) -> bytes:
        """One idempotent write through the group-commit writer; raises its refusal."""
        return mutation.outcome((await self.mutate_all([(ctx, effect, together)]))[0])

    async def mutate_all(self, items: list[Write]) -> list[bytes | errors.DomainError]:
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
        return [future.result() for future in futures]

    async def remember_nonce(self, key_id: str, nonce: str, now_ms: int) -> bool:
        """True the first time this key's nonce is seen, committed with the writer's next batch."""
        future = self.writer.submit(
            lambda conn: nonces.remember_in(conn, key_id, nonce, now_ms),
            lambda: nonces.remember(self.engine, key_id, nonce, now_ms),
            Bulk(nonces.remember_many, (key_id, nonce, now_ms)),
        )
        return await asyncio.wrap_future(future)

    async def maintain(self, work: Callable[[], T]) -> T:
        """Work that owns its transactions (clearing, pruning), beside the writer."""
        return await asyncio.get_running_loop().run_in_executor(self._maintenance, work)

    async def read(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, work)

    def close(self) -> None:
        self.writer.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._maintenance.shutdown(wait=True)
        self._reader.shutdown(wait=True)
