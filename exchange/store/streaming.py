"""Reading millions of rows in one transaction with memory that stays flat."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Connection, Select, TextClause

from exchange.store.engine import is_sqlite

STREAM_BATCH = 10_000


def stream_rows(
    conn: Connection, statement: Select[Any] | TextClause, params: Mapping[str, Any] | None = None
) -> Iterator[tuple[Any, ...]]:
    """Rows through the DBAPI cursor in batches: for millions of rows SQLAlchemy's per-row Result
    machinery costs more than the database's own work. Same transaction, same connection."""
    compiled = statement.compile(dialect=conn.dialect)
    bound = compiled.construct_params(dict(params) if params else None)
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    # PostgreSQL: a named (server-side) cursor, so rows arrive batch by batch instead of all at once.
    cursor = dbapi.cursor() if is_sqlite(conn.engine) else dbapi.cursor(name=f"pointsx_{uuid.uuid4().hex[:12]}")  # type: ignore[call-arg]
    try:
        if compiled.positiontup is not None:
            cursor.execute(str(compiled), [bound[name] for name in compiled.positiontup])
        else:
            cursor.execute(str(compiled), bound)
        while rows := cursor.fetchmany(STREAM_BATCH):
            yield from rows
    finally:
        cursor.close()
