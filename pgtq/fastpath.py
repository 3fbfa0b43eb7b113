"""The driver fast path: a :class:`~pgtq.statements.Query` run straight on the driver.

SQLAlchemy's execution of a statement costs about 0.3 ms of CPU (a single enqueue's
budget, a claim's and a completion's): here a statement is compiled once per dialect, its
parameters are put in the driver's order, and the driver runs the SQL text and returns its
rows, which the query's mapper reads by position as it reads SQLAlchemy's. Only a query that
has a driver form (``Query.driver``: parameters that need no SQLAlchemy bind processing)
comes here. Connections, their retries and their errors are the connectors' (connectors.py).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from json.scanner import make_scanner
from typing import Any, cast

import sqlalchemy as sa

from pgtq.model import dumps
from pgtq.statements import Query, Rows


class NoDriverForm(TypeError):
    """A query without a driver form was given to what runs only driver forms."""


def require_driver_form(query: Query[Any]) -> None:
    """Refuse, with a message that names it, a query the fast path cannot run as it is."""
    if not query.driver:
        mapper = getattr(query.mapper, "__qualname__", repr(query.mapper))
        raise NoDriverForm(
            f"a dedicated connection runs only queries with a driver form (Query.driver), "
            f"not {type(query.statement).__name__} mapped by {mapper}: run it on the "
            f"connector (AsyncConnector.run), or give it a driver form in statements.py"
        )


@dataclass(frozen=True, slots=True)
class Compiled:
    statement: Any  # held, so its id() cannot be reused while this entry lives
    sql: str
    names: tuple[str, ...]
    defaults: dict[str, Any]


class DriverSQL:
    """Statements compiled once for one dialect, and their parameters in its order.
    Statements are built once per schema (statements.py), so this holds a handful."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[int, Compiled] = {}

    def compile(self, statement: Any) -> Compiled:
        found = self._compiled.get(id(statement))
        if found is None or found.statement is not statement:
            compiled = statement.compile(dialect=self._dialect)
            names = tuple(compiled.positiontup or ())
            found = Compiled(statement, compiled.string, names, compiled.params)
            if len(self._compiled) >= 256:  # not a statement cached by statements.py
                self._compiled.clear()
            self._compiled[id(statement)] = found
        return found

    def positional(self, query: Query[Any]) -> tuple[str, list[Any]]:
        """asyncpg: ``$n`` placeholders."""
        c = self.compile(query.statement)
        params = query.params
        return c.sql, [params[n] if n in params else c.defaults[n] for n in c.names]

    def named(self, query: Query[Any]) -> tuple[str, dict[str, Any]]:
        """psycopg: ``%(name)s`` placeholders."""
        c = self.compile(query.statement)
        return c.sql, {**c.defaults, **query.params}


def fetch_asyncpg(driver: Any, sql: DriverSQL, query: Query[Any]) -> Awaitable[Rows]:
    """The query's rows from an asyncpg connection (outside a transaction block, asyncpg
    commits each statement); prepared once per connection by asyncpg's statement cache.
    Not a coroutine of its own: the driver's is awaited as it is (one frame less a call)."""
    text, args = sql.positional(query)
    rows: Awaitable[Rows] = driver.fetch(text, *args)
    return rows


def fetch_psycopg(driver: Any, sql: DriverSQL, query: Query[Any]) -> Rows:
    """The query's rows from a psycopg connection, run in autocommit (set client-side, no
    round trip, and unset again for the pool)."""
    text, params = sql.named(query)
    driver.autocommit = True
    try:
        rows: Rows = driver.execute(text, params).fetchall()
    finally:
        if not driver.closed:
            driver.autocommit = False
    return rows


# The C scanner json.loads uses (typeshed types make_scanner's argument oddly).
_scan_json: Callable[[str, int], tuple[Any, int]] = make_scanner(cast(Any, json.JSONDecoder()))


def loads_jsonb(text: str) -> Any:
    """PostgreSQL's text of a ``jsonb`` value (canonical: no leading blank), read by the C
    scanner alone; anything it refuses goes to ``json.loads`` for the proper error."""
    try:
        return _scan_json(text, 0)[0]
    except StopIteration:
        return json.loads(text)


async def read_jsonb_as_text(driver: Any) -> None:
    """An asyncpg connection's ``jsonb`` values come as text, read by JSON's C scanner (the
    claims' arguments: ~0.75 µs a job less than SQLAlchemy's binary decoder and
    ``json.loads``)."""
    await driver.set_type_codec(
        "jsonb", schema="pg_catalog", encoder=dumps, decoder=loads_jsonb, format="text"
    )


__all__ = [
    "Compiled",
    "DriverSQL",
    "NoDriverForm",
    "fetch_asyncpg",
    "fetch_psycopg",
    "loads_jsonb",
    "read_jsonb_as_text",
    "require_driver_form",
]
