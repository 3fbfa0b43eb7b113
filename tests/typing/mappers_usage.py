"""Checked by mypy --strict from tests/test_fast_path.py (not collected by pytest).

A ``Query``'s mapper takes positional rows, whoever ran the statement: one written against a
SQLAlchemy ``Result`` (``.first()``, ``.rowcount``, ``.scalar()``) does not type-check. Each
``type: ignore`` below must be needed, or mypy (warn_unused_ignores, part of --strict)
reports it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import CursorResult, Result

from pgtq.statements import Query, Rows, statements_for

s = statements_for("pgtq")


def ids(rows: Rows) -> list[int]:
    return [row[0] for row in rows]


def first_or_none(result: Result[Any]) -> Any:
    return result.first()


def rowcount(result: CursorResult[Any]) -> int:
    return result.rowcount


good = Query(s.heartbeat, {"me": "w"}, ids)
counted = Query(s.heartbeat, {"me": "w"}, len)
on_result = Query(s.get, {"job_id": 1}, first_or_none)  # type: ignore[arg-type]
on_count = Query(s.heartbeat, {"me": "w"}, rowcount)  # type: ignore[arg-type]
on_lambda = Query(s.heartbeat, {"me": "w"}, lambda r: r.rowcount)  # type: ignore[attr-defined]
