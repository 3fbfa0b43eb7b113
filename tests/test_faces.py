"""The faces (command line, demo, web, dashboards, testing helpers, metrics) hold to their two
rules without a database: they use pgtq's public names only, and every list of jobs they ask
for is one :class:`pgtq.jobs.JobFilter`."""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest

import pgtq
from pgtq.jobs import InvalidFilter, JobFilter, JobManager
from pgtq.model import Status

pytestmark = pytest.mark.unit

PACKAGE = Path(pgtq.__file__).parent

#: The modules that sit on the public API and may not reach below it.
FACES = sorted(
    [
        PACKAGE / "cli.py",
        PACKAGE / "demo.py",
        PACKAGE / "dashboard.py",
        PACKAGE / "testing.py",
        PACKAGE / "metrics.py",
        *(PACKAGE / "web").glob("*.py"),
    ]
)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """Each ``x._name`` with ``x`` not ``self``/``cls``, and each import of a private pgtq name
    (``from pgtq.m import _name``, ``import pgtq._m``), as ``line: what``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            inside = node.level > 0 or module == "pgtq" or module.startswith("pgtq.")
            names = [*module.split("."), *(alias.name for alias in node.names)]
            if inside and any(_private(name) for name in names):
                found.append(f"{node.lineno}: from {module} import ...")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pgtq" and any(_private(part) for part in parts):
                    found.append(f"{node.lineno}: import {alias.name}")
    return found


def test_the_faces_are_all_found() -> None:
    assert {p.name for p in FACES} >= {"cli.py", "views.py", "server.py", "testing.py"}


@pytest.mark.parametrize("path", FACES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_face_uses_public_names_only(path: Path) -> None:
    assert private_uses(path.read_text()) == [], f"{path.name} reaches below the public API"


def test_the_rule_sees_what_it_forbids_and_lets_the_rest_pass() -> None:
    source = """
from pgtq.app import App, _where
from pgtq import __version__
import pgtq._internal
app._url
self._console
cls._cache
obj.__class__
app.url
"""
    assert private_uses(source) == [
        "2: from pgtq.app import ...",
        "4: import pgtq._internal",
        "5: app._url",
    ]


# -- one JobFilter ----------------------------------------------------------------------------

#: An app whose database does not exist: every check below fails before a connection is made.
NOWHERE = "postgresql://pgtq:pgtq@127.0.0.1:9/nowhere"


def _list(side: str, **filters: Any) -> Any:
    app = pgtq.App(NOWHERE)
    if side == "sync":
        return app.jobs.list(**filters)
    return asyncio.run(app.jobs.list_async(**filters))


@pytest.mark.parametrize("side", ["sync", "async"])
@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"limit": 0}, "limit must be from 1"),
        ({"limit": True}, "limit must be an integer"),
        ({"after": 2**63}, "after must be a job id"),
        ({"status": "finished"}, "unknown status"),
        ({"status": ["todo", "nope"]}, "unknown status"),
        ({"queue": "a\x00b"}, "queue must not contain a NUL"),
        ({"task": 7}, "task must be a str"),
        ({"search": "\ud800"}, "search must be valid Unicode"),
    ],
)
def test_a_bad_filter_is_refused_before_any_connection(
    side: str, filters: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidFilter, match=message):
        _list(side, **filters)


@pytest.mark.parametrize("side", ["sync", "async"])
def test_an_unknown_filter_is_a_type_error_as_for_any_keyword(side: str) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'statu'"):
        _list(side, statu="failed")


def test_both_twins_take_the_one_filter() -> None:
    for method in (JobManager.list, JobManager.list_async):
        [_, filters] = inspect.signature(method).parameters.values()
        assert filters.kind is inspect.Parameter.VAR_KEYWORD
    assert JobFilter.__optional_keys__ == {
        "ids",
        "queue",
        "status",
        "task",
        "lock",
        "tags",
        "search",
        "before",
        "since",
        "workflow",
        "limit",
        "after",
        "newest_first",
    }


def test_the_web_jobs_page_reads_its_query_string_as_a_job_filter() -> None:
    pytest.importorskip("starlette")
    from starlette.requests import Request

    from pgtq.web.views import PAGE_SIZE, job_filter, query_string

    query = "queue=emails&status=failed&task=send&q=ann&after=41"
    request = Request({"type": "http", "query_string": query.encode(), "headers": []})
    filters = job_filter(request)
    assert filters == JobFilter(
        queue="emails",
        status=Status.FAILED,
        task="send",
        search="ann",
        after=41,
        limit=PAGE_SIZE,
        newest_first=True,
    )
    assert set(filters) <= JobFilter.__optional_keys__
    assert query_string(filters) == query
    assert query_string(filters, after=None, q=None) == "queue=emails&status=failed&task=send"
    empty = job_filter(Request({"type": "http", "query_string": b"", "headers": []}))
    assert query_string(empty) == ""
