"""Alembic environment: runs against the engine pointsx builds (same SQLite hooks as the hub)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from exchange.store.engine import make_engine
from exchange.store.schema import metadata

config = context.config


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "", pool_size=1)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things: batch mode copies the table
        compare_type=True,
    )
    # Batch mode rebuilds a SQLite table (copy, drop, rename); with foreign keys enforced, dropping a
    # table that others reference fails once they hold rows. So: off for the migration (the pragma
    # only takes effect outside a transaction), every reference checked before commit, on again.
    raw = connection.connection.dbapi_connection if connection.dialect.name == "sqlite" else None
    if raw is not None:
        raw.execute("PRAGMA foreign_keys=OFF")  # type: ignore[attr-defined]
    try:
        with context.begin_transaction():
            context.run_migrations()
            if raw is not None:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left rows referencing nothing: {broken[:5]}")
    finally:
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=ON")  # type: ignore[attr-defined]


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; pass a database URL")
run_migrations_online()
