"""A real hub on a real port for tests: in-process, on its own event loop thread.

PostgreSQL databases are cloned from a migrated template, so each test gets a fresh one quickly.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from exchange.background import BackgroundHub
from exchange.config import HubConfig, init_data_dir, load_key
from exchange.domain.clock import Clock
from exchange.hub import Hub
from exchange.operator_client import OperatorClient
from exchange.runtime import open_hub
from exchange.store import migrate
from merchant_sdk import MerchantClient
from merchant_sdk.signing import public_key_bytes

PG_ADMIN_DSN = os.environ.get("POINTSX_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
_TEMPLATE = f"pointsx_tmpl_{os.getpid()}"
_template_ready = False
_template_lock = threading.Lock()


def _admin() -> psycopg.Connection:
    return psycopg.connect(PG_ADMIN_DSN, autocommit=True)


def _url(dbname: str) -> str:
    params = dict(part.split("=", 1) for part in PG_ADMIN_DSN.split())
    user, host, port = params.get("user", "postgres"), params.get("host", "127.0.0.1"), params.get("port", "5432")
    return f"postgresql+psycopg://{user}@{host}:{port}/{dbname}"


def fresh_postgres_database() -> tuple[str, str]:
    """(url, dbname) of a new migrated database; CI fails here loudly if PostgreSQL is missing."""
    global _template_ready
    with _template_lock:
        if not _template_ready:
            with _admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{_TEMPLATE}"')
                conn.execute(f'CREATE DATABASE "{_TEMPLATE}"')
            migrate.upgrade(_url(_TEMPLATE))
            _template_ready = True
    name = f"pointsx_t_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{_TEMPLATE}"')
    return _url(name), name


def drop_postgres_database(name: str) -> None:
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def drop_template() -> None:
    if _template_ready:
        drop_postgres_database(_TEMPLATE)


class RunningHub:
    """A real hub on 127.0.0.1:0 (see exchange.background); `stop()` shuts it down."""

    def __init__(
        self,
        tmp: Path,
        database_url: str | None,
        *,
        clock: Clock | None = None,
        config_overrides: dict[str, object] | None = None,
    ) -> None:
        cfg: HubConfig = init_data_dir(tmp / "data")
        if config_overrides:
            cfg = replace(cfg, **config_overrides)  # type: ignore[arg-type]
        self.config = cfg
        self.hub: Hub = open_hub(cfg, database_url=database_url, migrate_now=True, clock=clock)
        self.operator_key = load_key(cfg.operator_key_path)
        self._background = BackgroundHub(self.hub)
        self.port = self._background.port
        self.target = self._background.target

    def stop(self) -> None:
        self._background.stop()

    def operator(self) -> OperatorClient:
        return OperatorClient(self.target, self.operator_key)

    def admit(
        self, merchant_id: str, *, currency: str = "CNY", value_micros: int = 10_000, cap_micros: int = 0
    ) -> tuple[MerchantClient, Ed25519PrivateKey]:
        key = Ed25519PrivateKey.generate()
        with self.operator() as op:
            op.register_merchant(
                merchant_id,
                merchant_id.title(),
                currency,
                value_micros,
                public_key_bytes(key.public_key()),
                net_debit_cap_micros=cap_micros,
            )
        return MerchantClient(self.target, merchant_id, key), key
