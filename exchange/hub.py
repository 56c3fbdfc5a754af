"""The running hub's shared state: config, database, clock, keys and the worker threads.

Database work is synchronous SQLAlchemy run off the event loop. Writes go through their own
executor: one thread on SQLite (one writer is all SQLite allows; queueing in Python is cheaper
than spinning on SQLITE_BUSY), several on PostgreSQL where guarded row updates serialise only the
rows that really collide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine

from exchange.config import HubConfig
from exchange.domain.clock import Clock, SystemClock
from exchange.rpc.auth import Authenticator
from exchange.store.engine import is_sqlite
from merchant_sdk.signing import key_id_of, public_key_bytes

T = TypeVar("T")
VERSION = "0.1.0"


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
        writers = 1 if is_sqlite(engine) else 8
        self._writer = ThreadPoolExecutor(writers, thread_name_prefix="ledger-writer")
        self._reader = ThreadPoolExecutor(4, thread_name_prefix="ledger-reader")

    @property
    def accepted_currencies(self) -> frozenset[str]:
        return frozenset(self.config.currencies)

    async def write(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, work)

    async def read(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, work)

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
