"""Many rows in one statement on either database: the group-commit writer's inserts and updates.

psycopg sends an `executemany` as one pipelined statement per row; SQLAlchemy's multi-row VALUES
pages make psycopg parse a new, huge query text for every page; psycopg's array adapter quotes
every string in Python. Each costs more CPU than the database spends storing the rows. On
PostgreSQL a batch's rows therefore travel as one JSON document (encoded by the json module's C
encoder), unpacked by `json_to_recordset` in one constant statement that psycopg prepares once.
Binary columns travel base64-encoded. SQLite's `executemany` is a loop in C over one prepared
statement already: it gets the rows as tuples, straight.
"""

from __future__ import annotations

import base64
import json
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

from sqlalchemy import (
    Connection,
    LargeBinary,
    Row,
    Select,
    Table,
    TextClause,
    and_,
    bindparam,
    column,
    select,
    text,
    true,
    tuple_,
)
from sqlalchemy.dialects import postgresql

from exchange.store.engine import is_sqlite


class RowsMoved(Exception):
    """A set-based write found rows changed under it since it read them: the ledger writer rolls
    the bulk run back and runs its items one at a time, each with its own guarded updates."""


_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


def _binary(table: Table, name: str) -> bool:
    return isinstance(table.c[name].type, LargeBinary)


def _recordset(table: Table, columns: tuple[str, ...]) -> tuple[str, str]:
    """The select list and the `AS x(...)` definition that read `columns` from the JSON rows."""
    values = ", ".join(f"decode(x.{name}, 'base64')" if _binary(table, name) else f"x.{name}" for name in columns)
    definition = ", ".join(
        f"{name} {'text' if _binary(table, name) else table.c[name].type.compile(dialect=_PG)}" for name in columns
    )
    return values, definition


# Statement templates name their parameters `:{p}name`; `{p}` becomes a prefix of its own for each
# statement when several are sent as one (see `flush`).
@cache
def _insert(table: Table, columns: tuple[str, ...]) -> str:
    values, definition = _recordset(table, columns)
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)})"
        f" SELECT {values} FROM json_to_recordset(CAST(:{{p}}rows AS json)) AS x({definition})"
    )


@cache
def _update(table: Table, keys: tuple[str, ...], columns: tuple[str, ...], add: bool) -> str:
    _values, definition = _recordset(table, keys + columns)
    sets = ", ".join(f"{name} = {table.name}.{name} + x.{name}" if add else f"{name} = x.{name}" for name in columns)
    where = " AND ".join(f"{table.name}.{name} = x.{name}" for name in keys)
    return (
        f"UPDATE {table.name} SET {sets} FROM json_to_recordset(CAST(:{{p}}rows AS json)) AS x({definition})"
        f" WHERE {where}"
    )


_LATER = "pointsx_bulk_later"


@contextmanager
def deferring(conn: Connection) -> Iterator[None]:
    """Until the block ends, PostgreSQL writes made through this module wait and then go as one.

    Each statement is a round trip, and on the writer thread each round trip gives up the GIL and
    waits to get it back from the event loop; a batch's writes are independent of each other (no
    write here reads another's rows), so they travel together as data-modifying CTEs of one
    statement when the block ends. Reads still run at once. An exception drops what waits: the
    caller rolls the work back anyway.
    """
    if is_sqlite(conn.engine) or _LATER in conn.info:
        yield
        return
    conn.info[_LATER] = []
    try:
        yield
        flush(conn)
    finally:
        conn.info.pop(_LATER, None)


def later(conn: Connection, template: str, params: Mapping[str, Any]) -> None:
    """Run the write `template` (parameters `:{p}name`) now, or with the others at the end of `deferring`."""
    waiting: list[tuple[str, Mapping[str, Any]]] | None = conn.info.get(_LATER)
    if waiting is None:
        conn.execute(_text(template.replace("{p}", "")), dict(params))
    else:
        waiting.append((template, params))


def flush(conn: Connection) -> None:
    """Send what waits, as one statement."""
    waiting: list[tuple[str, Mapping[str, Any]]] = conn.info.get(_LATER) or []
    if not waiting:
        return
    statement = _combined(tuple(template for template, _params in waiting))
    params = {f"w{i}_{name}": value for i, (_t, p) in enumerate(waiting) for name, value in p.items()}
    waiting.clear()
    conn.execute(statement, params)


@cache
def _text(sql: str) -> TextClause:
    return text(sql)


@cache
def _combined(templates: tuple[str, ...]) -> TextClause:
    if len(templates) == 1:
        return text(templates[0].replace("{p}", "w0_"))
    parts = [t.replace("{p}", f"w{i}_") for i, t in enumerate(templates)]
    return text("WITH " + ", ".join(f"w{i} AS ({sql})" for i, sql in enumerate(parts[:-1])) + " " + parts[-1])


def _json(table: Table, rows: Sequence[Mapping[str, Any]], columns: tuple[str, ...]) -> str:
    binary = [name for name in columns if _binary(table, name)]
    if binary:
        rows = [
            {**row, **{n: None if row[n] is None else base64.b64encode(row[n]).decode() for n in binary}}
            for row in rows
        ]
    return json.dumps(rows, separators=(",", ":"))


def _tuples(rows: Sequence[Mapping[str, Any]], columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """The rows' values in `columns` order, picked in C (a generator per row costs as much as SQLite)."""
    if len(columns) == 1:
        return [(row[columns[0]],) for row in rows]
    return list(map(operator.itemgetter(*columns), rows))


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys, named by column) into `table` in one statement."""
    if not rows:
        return
    columns = tuple(rows[0])
    if is_sqlite(conn.engine):  # the driver's executemany, straight: no per-row parameter processing
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        conn.exec_driver_sql(sql, _tuples(rows, columns))
        return
    later(conn, _insert(table, columns), {"rows": _json(table, rows, columns)})


def update_rows(
    conn: Connection, table: Table, keys: tuple[str, ...], rows: Sequence[Mapping[str, Any]], *, add: bool = False
) -> None:
    """Set (or, with `add`, add to) the non-key columns of each row found by its `keys`, in one statement."""
    if not rows:
        return
    columns = tuple(name for name in rows[0] if name not in keys)
    if is_sqlite(conn.engine):
        sets = ", ".join(f"{name} = {name} + ?" if add else f"{name} = ?" for name in columns)
        sql = f"UPDATE {table.name} SET {sets} WHERE {' AND '.join(f'{k} = ?' for k in keys)}"
        conn.exec_driver_sql(sql, _tuples(rows, columns + keys))
        return
    later(conn, _update(table, keys, columns, add), {"rows": _json(table, rows, keys + columns)})


def select_by_keys(
    conn: Connection, query: Select[Any], table: Table, keys: tuple[str, ...], values: Sequence[tuple[Any, ...]]
) -> Sequence[Row[Any]]:
    """`query` (on `table`) restricted to the rows whose `keys` columns match one of `values`."""
    if not values:
        return []
    statement, params = by_keys(conn, query, table, keys, values)
    return conn.execute(statement, params).all()


def by_keys(
    conn: Connection, query: Select[Any], table: Table, keys: tuple[str, ...], values: Sequence[tuple[Any, ...]]
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement and parameters of `select_by_keys`, to send with others (`dialect.read_all`).

    SQLite: a row-value IN list. PostgreSQL: the values as a JSON recordset — a thousand-pair IN
    list costs PostgreSQL more to plan than to run — each looked up by the table's index in a
    LATERAL subquery that `OFFSET 0` keeps from being flattened into a join: a hash join would
    scan the whole (ever-growing) table whenever its statistics are behind.
    """
    if is_sqlite(conn.engine):
        return _in_keys(query, table, keys), {"keys": list(values)}
    rows = json.dumps([dict(zip(keys, v, strict=True)) for v in values], separators=(",", ":"))
    return _by_keys(query, table, keys), {"key_rows": rows}


@cache
def _in_keys(query: Select[Any], table: Table, keys: tuple[str, ...]) -> Select[Any]:
    """Built once per query: a statement built per call costs its cache key every time."""
    return query.where(tuple_(*(table.c[k] for k in keys)).in_(bindparam("keys", expanding=True)))


@cache
def _by_keys(query: Select[Any], table: Table, keys: tuple[str, ...]) -> Select[Any]:
    recordset = _key_recordset(table, keys)
    found = query.where(and_(*(table.c[k] == recordset.c[k] for k in keys))).offset(0).lateral("found")
    return select(found).select_from(recordset).join(found, true())


@cache
def _key_recordset(table: Table, keys: tuple[str, ...]) -> Any:
    _values, definition = _recordset(table, keys)
    columns = [column(k, table.c[k].type) for k in keys]
    return (
        text(f"SELECT * FROM json_to_recordset(CAST(:key_rows AS json)) AS x({definition})")
        .columns(*columns)
        .subquery("wanted")
    )
