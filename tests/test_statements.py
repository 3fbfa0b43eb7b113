"""No bound parameter is named like a column of a table its statement writes (no database).

Where SQLAlchemy executes an INSERT or UPDATE (psycopg async, the sync side), a parameter named
like a column of the written table is a value to write: used elsewhere in the statement it
fails the statement ("bindparam() name 'queue' is reserved for automatic usage ..."; the
one-queue claim on psycopg async ran nothing), unused it is added to the SET clause. asyncpg's
fast path hides the bug. This walks every statement ``Statements`` builds (each variant of
the builders that take arguments) and every ``Query`` the functions of ``pgtq.statements``
make, so a new one cannot bring such a name back: a new builder or function fails here until
it is listed below.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import BindParameter

from pgtq import statements
from pgtq.model import Status
from pgtq.statements import (
    ACTS_ON,
    Conflict,
    ListKey,
    NewJobs,
    Outcomes,
    Progress,
    Query,
    Rare,
    Selection,
    SelectionKey,
    Statements,
    TickRows,
)
from pgtq.turns import Answer

pytestmark = pytest.mark.unit

S = statements.statements_for("pgtq")
TABLES = S.t.jobs.metadata.tables  # "pgtq.jobs", ...

#: Every variant of the builders that take arguments (the worker's claims for all, one and
#: several queues, every filter of a list, ...).
EVERY_LIST_FILTER = ListKey(
    ids=True,
    queue=True,
    statuses=(Status.TODO,),
    task=True,
    lock=True,
    tags=True,
    search=True,
    before="at",
    since="ago",
    after=True,
)
#: Every filter of a selection, the other form of each bound.
EVERY_FILTER = SelectionKey(
    ids=True,
    queue=True,
    statuses=(Status.FAILED,),
    task=True,
    lock=True,
    tags=True,
    search=True,
    before="ago",
    since="at",
)
EVERY_SELECTION = Selection(
    ids=(1, 2),
    queue="q",
    statuses=(Status.FAILED,),
    task="t",
    lock="l",
    tags=("a", "b"),
    search="x",
    before=60.0,
    since=datetime(2024, 1, 1, tzinfo=UTC),
)
BUILDER_ARGS: dict[str, list[tuple[Any, ...]]] = {
    "claim": [
        *((queues, n) for queues in (None, ["a"], ["a", "b"]) for n in (1, 20)),
        *((queues, 20, True) for queues in (None, ["a"], ["a", "b"])),  # answering a turn
    ],
    "claim_limited": [(None,), (["a"],), (["a", "b"],), (None, True), (["a"], True)],
    "fail_unclaimable": [(False,), (True,)],
    "list_jobs": [(ListKey(),), (EVERY_LIST_FILTER,), (ListKey(after=True, newest_first=True),)],
    "delete_old": [((Status.SUCCEEDED,), False), ((Status.SUCCEEDED, Status.FAILED), True)],
    "bulk": [
        (action, key, preview)
        for action in ACTS_ON
        for key in (SelectionKey(), EVERY_FILTER)
        for preview in (False, True)
    ],
    "throughput": [(False,), (True,)],
    "set_history": [(True,), (False,)],
    "insert_keyed": [
        (Conflict(replace, per_period),)
        for replace in (False, True)
        for per_period in (False, True)
    ],
    "insert_each": [
        *(((mode,),) for mode in statements.EACH_MODES),
        (statements.EACH_MODES,),
    ],
    "completion": [
        *(
            (deleting, Rare(snoozing, moving))
            for deleting in (False, True)
            for snoozing in (False, True)
            for moving in (False, True)
        ),
        # ctx.set_progress: outcomes with their last progress, running jobs' progress, both.
        *(
            (deleting, Rare(True, False, progress, running))
            for deleting in (False, True)
            for progress, running in ((True, False), (False, True), (True, True))
        ),
        # App(notify_completions=False): no NOTIFY of the jobs that ended.
        *((deleting, rare, True) for deleting in (False, True) for rare in (Rare(), Rare(True))),
    ],
}
#: Attributes of ``Statements`` that are not statements.
NOT_STATEMENTS = {"job_columns", "_built", "_channel"}


def built_statements() -> Iterator[tuple[str, Any]]:
    """(name, statement) for every statement ``Statements`` builds."""
    for name, attr in vars(Statements).items():
        if name.startswith("__"):
            continue
        if isinstance(attr, cached_property | property):
            if name in NOT_STATEMENTS:
                continue
            value = getattr(S, name)
            assert isinstance(value, sa.sql.ClauseElement), (
                f"Statements.{name} is no statement: add it to NOT_STATEMENTS"
            )
            yield name, value
        elif inspect.isfunction(attr) and not name.startswith("_"):
            # Private methods build parts of the public ones: checked through them.
            assert name in BUILDER_ARGS, (
                f"Statements.{name} is a new builder: add its variants to BUILDER_ARGS"
            )
            for args in BUILDER_ARGS[name]:
                yield f"{name}{args!r}", getattr(S, name)(*args)


def _new_jobs() -> NewJobs:
    return NewJobs("q", "t", 0, None, None, None, None, None, None, "[{}]", 1)


def _each_jobs() -> statements.EachJobs:
    """A batch with a row of every mode."""
    rows = [
        statements.EachRow(
            mode,
            "q",
            0,
            {},
            queueing_lock=None if mode == "plain" else mode,
            unique_for=60.0 if mode.endswith("_period") else None,
        )
        for mode in statements.EACH_MODES
    ]
    return statements.EachJobs.make("t", None, rows, list(range(len(rows))))


def _outcomes() -> Outcomes:
    outcomes = Outcomes.empty()
    outcomes.add(1, Status.SUCCEEDED, "null", attempt=1)
    return outcomes


def _rare_outcomes() -> Outcomes:
    """A snooze and a retry that moves its job: the completion's variants."""
    outcomes = _outcomes()
    outcomes.append(2, 1, "snoozed", None, None, 5.0)
    outcomes.add(3, Status.TODO, None, "{}", 0.0, attempt=1)
    outcomes.moves[3] = ("slow", None)
    return outcomes


def _progressing() -> Outcomes:
    """An outcome with its job's last progress (``ctx.set_progress``)."""
    outcomes = _outcomes()
    outcomes.progress[1] = '{"fraction": 1.0, "message": null, "attempt": 1}'
    return outcomes


def _progress() -> Progress:
    return Progress([2], [1], ['{"fraction": 0.5, "message": "half", "attempt": 1}'])


NOW = datetime(2024, 1, 1, tzinfo=UTC)
#: Every query function of ``pgtq.statements``, each with calls covering its variants.
QUERIES: dict[str, list[Callable[[], Any]]] = {
    "insert_jobs": [lambda: statements.insert_jobs(S, _new_jobs())],
    "insert_keyed_job": [
        lambda: statements.insert_keyed_job(S, _new_jobs(), replace=False),
        lambda: statements.insert_keyed_job(S, _new_jobs(), replace=True),
        lambda: statements.insert_keyed_job(S, _new_jobs(), replace=False, unique_for=60.0),
    ],
    "insert_each_jobs": [lambda: statements.insert_each_jobs(S, _each_jobs())],
    "get_job": [lambda: statements.get_job(S, 1)],
    "claim_jobs": [
        lambda: statements.claim_jobs(S, "w", None, 20),
        lambda: statements.claim_jobs(S, "w", ["a"], 20),
        lambda: statements.claim_jobs(S, "w", ["a", "b"], 20),
        lambda: statements.claim_jobs(S, "w", ["a"], 20, Answer(40, "a")),
    ],
    "complete_jobs": [
        lambda: statements.complete_jobs(S, "w", _outcomes()),
        lambda: statements.complete_jobs(S, "w", _outcomes(), ("succeeded",)),
        lambda: statements.complete_jobs(S, "w", _rare_outcomes()),
        lambda: statements.complete_jobs(S, "w", _rare_outcomes(), ("succeeded",)),
        lambda: statements.complete_jobs(S, "w", _progressing(), (), _progress()),
        lambda: statements.complete_jobs(S, "w", _progressing(), ("succeeded",), _progress()),
        lambda: statements.complete_jobs(S, "w", _outcomes(), releasing=True),
        lambda: statements.complete_jobs(S, "w", _rare_outcomes(), ("succeeded",), releasing=True),
        lambda: statements.complete_jobs(S, "w", _progressing(), (), _progress(), releasing=True),
        lambda: statements.complete_jobs(S, "w", _outcomes(), quiet=True),
        lambda: statements.complete_jobs(S, "w", _outcomes(), ("succeeded",), quiet=True),
        lambda: statements.complete_jobs(S, "w", _outcomes(), quiet=True, releasing=True),
        lambda: statements.complete_jobs(
            S, "w", _outcomes(), ("succeeded",), quiet=True, releasing=True
        ),
    ],
    "insert_workflow": [
        lambda: statements.insert_workflow(
            S, statements.WorkflowJobs('[{"n": 0, "task_name": "t"}]', "[]")
        )
    ],
    "parent_results": [lambda: statements.parent_results(S, 1)],
    "close_batch": [
        lambda: statements.close_batch(S, 1),
        lambda: statements.close_batch(S, 1, True),
    ],
    "dependencies": [lambda: statements.dependencies(S, 1)],
    "workflow_edges": [lambda: statements.workflow_edges(S, 1)],
    "ended_among": [lambda: statements.ended_among(S, [1, 2])],
    "watcher_up": [lambda: statements.watcher_up(S, "w1", 30.0)],
    "watcher_down": [lambda: statements.watcher_down(S, "w1")],
    "write_progress": [lambda: statements.write_progress(S, "w", _progress())],
    "release_jobs": [lambda: statements.release_jobs(S, "w", [1])],
    "release_unknown_jobs": [lambda: statements.release_unknown_jobs(S, "w", [1])],
    "fail_unclaimable_jobs": [
        lambda: statements.fail_unclaimable_jobs(S),
        lambda: statements.fail_unclaimable_jobs(S, ["a"], scan=10),
    ],
    "no_such_job": [lambda: statements.no_such_job(S, statements.get_job(S, 1))],
    "abort_job": [lambda: statements.abort_job(S, 1)],
    "retry_job": [lambda: statements.retry_job(S, 1)],
    "reschedule_job": [
        lambda: statements.reschedule_job(S, 1, datetime(2040, 1, 1, tzinfo=UTC), None, 3),
        lambda: statements.reschedule_job(S, 1, None, 5.0),
    ],
    "fail_job": [lambda: statements.fail_job(S, 1, "why")],
    "abort_requested_ids": [lambda: statements.abort_requested_ids(S, "w")],
    "make_due": [
        lambda: statements.make_due(S, None),
        lambda: statements.make_due(S, ["a"]),
    ],
    "next_due_in": [
        lambda: statements.next_due_in(S, None),
        lambda: statements.next_due_in(S, ["a"]),
    ],
    "is_migrated": [lambda: statements.is_migrated(S)],
    "status_counts": [lambda: statements.status_counts(S)],
    "status_counts_of": [lambda: statements.status_counts_of(S, [1])],
    "register_worker": [
        lambda: statements.register_worker(S, "w", "host", 1, None),
        lambda: statements.register_worker(S, "w", "host", 1, ["a"]),
    ],
    "heartbeat": [lambda: statements.heartbeat(S, "w")],
    "job_history": [lambda: statements.job_history(S, 1)],
    "set_history": [lambda: statements.set_history(S, True)],
    "claim_limited": [
        lambda: statements.claim_limited(S, "w", None, 20, {"task:t": 1}, {"t": 2}),
        lambda: statements.claim_limited(S, "w", ["a"], 20, {}, {}),
        lambda: statements.claim_limited(S, "w", None, 20, {}, {}, Answer(40, "a")),
        lambda: statements.claim_limited(S, "w", None, 20, {"key:t#k": 0}, {}, None, {"t": 5}),
    ],
    "roster": [lambda: statements.roster(S)],
    "announce": [lambda: statements.announce(S, "q")],
    "limits_lock": [lambda: statements.limits_lock(S)],
    "running_counts": [lambda: statements.running_counts(S, ["t"], ["q"])],
    "read_buckets": [lambda: statements.read_buckets(S, ["task:t"])],
    "read_key_buckets": [lambda: statements.read_key_buckets(S, ["t"])],
    "delete_buckets": [lambda: statements.delete_buckets(S, ["key:t#k"])],
    "write_buckets": [lambda: statements.write_buckets(S, {"task:t": 1.0})],
    "queue_limits": [lambda: statements.queue_limits(S)],
    "clear_old_results": [lambda: statements.clear_old_results(S, 60.0)],
    "set_queue_limits": [lambda: statements.set_queue_limits(S, "q", 2, 10.0)],
    "forget_dead_workers": [lambda: statements.forget_dead_workers(S, 30.0, "me")],
    "orphaned_jobs": [lambda: statements.orphaned_jobs(S)],
    "unregister_worker": [lambda: statements.unregister_worker(S, "w")],
    "list_jobs": [
        lambda: statements.list_jobs(S),
        lambda: statements.list_jobs(S, EVERY_SELECTION, after=1, newest_first=True),
    ],
    "bulk_jobs": [
        *(lambda a=a: statements.bulk_jobs(S, a, EVERY_SELECTION) for a in ACTS_ON),
        lambda: statements.bulk_jobs(S, "delete", Selection(ids=(1,)), preview=True),
        lambda: statements.bulk_jobs(S, "retry", Selection()),
    ],
    "stats_queries": [lambda: statements.stats_queries(S, 60.0)],
    "delete_old_jobs": [
        lambda: statements.delete_old_jobs(S, 60.0, (Status.SUCCEEDED,)),
        lambda: statements.delete_old_jobs(S, 60.0, (Status.FAILED,), queue="q"),
    ],
    "cancel_job": [lambda: statements.cancel_job(S, 1)],
    "pause_queue": [lambda: statements.pause_queue(S, "q")],
    "resume_queue": [lambda: statements.resume_queue(S, "q")],
    "list_queues": [lambda: statements.list_queues(S)],
    "declare_queues": [lambda: statements.declare_queues(S, ["q", "r"])],
    "jobs_statistics": [lambda: statements.jobs_statistics(S)],
    "analyze_lock": [lambda: statements.analyze_lock(S)],
    "analyze_jobs": [lambda: statements.analyze_jobs(S)],
    "analyze_wait": [lambda: statements.analyze_wait(S)],
    "defer_ticks": [lambda: statements.defer_ticks(S, TickRows.empty())],
    "delete_old_ticks": [lambda: statements.delete_old_ticks(S, 60.0)],
    "register_schedules": [lambda: statements.register_schedules(S, [("t", ""), ("t", "eu")])],
    "pause_schedule": [lambda: statements.pause_schedule(S, "t", "eu")],
    "resume_schedule": [lambda: statements.resume_schedule(S, "t", "eu")],
    "run_schedule_now": [lambda: statements.run_schedule_now(S, TickRows.empty())],
    "schedule_states": [lambda: statements.schedule_states(S, [("t", "")])],
    "throughput": [
        lambda: statements.throughput(S, 3600.0, 60.0),
        lambda: statements.throughput(S, 3600.0, 60.0, queue="q"),
    ],
    "worker_heartbeats": [lambda: statements.worker_heartbeats(S)],
}


def query_functions() -> set[str]:
    """The functions of ``pgtq.statements`` that make a ``Query`` (or several)."""
    return {
        name
        for name, fn in vars(statements).items()
        if inspect.isfunction(fn)
        and fn.__module__ == statements.__name__
        and not name.startswith("_")
        and "Query[" in str(fn.__annotations__.get("return", ""))
    }


def named_binds(statement: Any) -> list[BindParameter[Any]]:
    """The bound parameters the statement's author named (not SQLAlchemy's own: anonymous
    literals, the values an INSERT or UPDATE sets)."""
    compiled = statement.compile(dialect=postgresql.dialect())
    binds = {id(b): b for b in compiled.binds.values()}.values()
    return [b for b in binds if not b.unique and not b._is_crud]


_WRITES = re.compile(r"\b(?:INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)\.(\w+)")


def written_columns(statement: Any) -> dict[str, str]:
    """Column name → ``schema.table`` for every table the statement inserts, updates or
    deletes (CTEs included: read off the SQL it runs)."""
    sql = str(statement.compile(dialect=postgresql.dialect()))
    columns: dict[str, str] = {}
    for schema, table in _WRITES.findall(sql):
        for column in TABLES[f"{schema}.{table}"].columns:
            columns[column.name] = f"{schema}.{table}"
    return columns


def collisions(names: set[str], statement: Any) -> list[str]:
    written = written_columns(statement)
    return sorted(f"{n} (a column of {written[n]})" for n in names if n in written)


def test_the_walk_sees_the_statements_that_write() -> None:
    """The walk is no empty check: the claims and the insert are in it, writing jobs."""
    walked = dict(built_statements())
    assert "insert_jobs" in walked and "claim(['a'], 20)" in walked
    assert "queue" in written_columns(walked["claim(['a'], 20)"])
    assert set(written_columns(walked["defer_ticks"])) >= {"queue", "periodic_id", "tick_at"}
    assert set(written_columns(walked["complete_deleting"])) >= {"type", "attempt", "status"}
    # The regression itself: the one-queue claim takes the queue under another name.
    assert "only_queue" in {b.key for b in named_binds(walked["claim(['a'], 20)"])}


@pytest.mark.parametrize("name", [name for name, _ in built_statements()])
def test_no_bound_parameter_is_named_like_a_written_column(name: str) -> None:
    statement = dict(built_statements())[name]
    names = {b.key for b in named_binds(statement)}
    assert not collisions(names, statement), (
        f"{name}: bound parameters named like columns it writes: {collisions(names, statement)}; "
        "rename them (:me, :only_queue, :new_<column>: see pgtq/statements.py's docstring)"
    )


def test_every_query_function_is_walked() -> None:
    assert query_functions() == set(QUERIES), (
        "a query function of pgtq.statements is missing from QUERIES (or gone): "
        f"{sorted(query_functions() ^ set(QUERIES))}"
    )


def _queries(name: str) -> Iterator[Query[Any]]:
    for make in QUERIES[name]:
        made = make()
        yield from made if isinstance(made, tuple) else [made]


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_a_query_passes_exactly_the_parameters_its_statement_takes(name: str) -> None:
    """No key of a query's parameters is a column the statement writes, none is a parameter
    the statement does not take (SQLAlchemy would write it to that column, or ignore it),
    and every parameter the statement needs is given."""
    for query in _queries(name):
        binds = named_binds(query.statement)
        taken = {b.key for b in binds}
        given = set(query.params)
        assert not collisions(given, query.statement), (name, collisions(given, query.statement))
        assert given <= taken, f"{name}: parameters its statement does not take: {given - taken}"
        needed = {b.key for b in binds if b.required}
        assert needed <= given, f"{name}: parameters missing: {needed - given}"


# -- driver forms: what runs straight on the driver (pgtq.fastpath) ------------------------------

#: What the worker runs on its dedicated connections, which run nothing but driver forms.
DEDICATED = ("claim_jobs", "complete_jobs", "release_jobs")
DRIVER_DIALECTS = {"asyncpg": postgresql.asyncpg.dialect(), "psycopg": postgresql.psycopg.dialect()}


def test_what_the_worker_runs_on_its_dedicated_connections_has_a_driver_form() -> None:
    for name in DEDICATED:
        assert all(query.driver for query in _queries(name)), name


@pytest.mark.parametrize("dialect", list(DRIVER_DIALECTS))
def test_a_driver_form_needs_no_bind_processing(dialect: str) -> None:
    """Its parameters go to the driver as they are: the only SQLAlchemy bind processing its
    statement has is ARRAY's, which leaves a list of plain values as it is."""
    for name in sorted(QUERIES):
        for query in _queries(name):
            if not query.driver:
                continue
            compiled = query.statement.compile(dialect=DRIVER_DIALECTS[dialect])
            for key, process in compiled._bind_processors.items():
                if process is None:
                    continue
                bind = compiled.binds[key]
                assert isinstance(bind.type, postgresql.ARRAY), (name, key, bind.type)
                assert process(query.params[key]) == query.params[key], (name, key)
