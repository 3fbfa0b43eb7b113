"""Every SQL statement pgtq runs, built once with SQLAlchemy Core, and the pure row mappers.

This is the one module where a job's status changes: search for a status name here to find
every transition. Statements are built per schema (``statements_for``) and cached, so
SQLAlchemy's compiled cache and the drivers' prepared statements see the same objects each
time. Nothing here does I/O; a :class:`Query` pairs a statement with its parameters and the
pure function that turns its result into a value, and either connector runs it.

A bound parameter is never named like a column of a table its statement writes (inserts,
updates or deletes): ``:me`` for the worker's id, ``:only_queue``, ``:new_<column>`` for the
values of new rows. Where SQLAlchemy executes an INSERT or UPDATE (psycopg async, the sync
side), it treats every parameter named like a column of that table as a value to write: a
parameter the statement also uses elsewhere fails it (the one-queue claim with ``:queue``
failed every time: "bindparam() name 'queue' is reserved ..."), and one it does not use is
added to its SET clause. The guard is ``tests/test_statements.py``: it walks every statement
built here and every ``Query`` the functions below make (a new builder or function must be
added to it) and fails on such a name, or on a parameter the statement does not take.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, REGCLASS
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.sql import Executable
from sqlalchemy.sql.dml import ReturningDelete, ReturningInsert, ReturningUpdate

from pgtq.model import MAX_SNOOZES, SNOOZED, ClaimedJob, Job, JobEvent, Status, dumps
from pgtq.reports import (
    COUNTED_STATUSES,
    QueueInfo,
    QueueStats,
    RunningJob,
    ScheduleState,
    Stats,
    Throughput,
    ThroughputBucket,
    WorkerInfo,
)
from pgtq.schema import (
    HISTORY_TRIGGERS,
    QUEUEING_LOCK_HELD,
    UNIQUE_KEY_HELD,
    Tables,
    notify_channel,
    tables_for,
)

if TYPE_CHECKING:
    from pgtq.turns import Answer

T = TypeVar("T")

#: A statement's rows as every mapper gets them, whatever ran it: positional, never a
#: SQLAlchemy ``Result`` (the connector takes its rows once: ``Result.all()``), nor a count
#: (a count is read from ``RETURNING``). Driver records (asyncpg's) and tuples (psycopg's)
#: are rows too, so one mapper serves the pooled path and the driver fast path alike.
Row = Sequence[Any]
Rows = Sequence[Row]
#: A claim: the update itself, or the update in a select that may call the other workers
#: (:meth:`Statements._answering`).
Claim = ReturningUpdate[Any] | sa.Select[Any]


def _status(status: Status) -> sa.ColumnElement[str]:
    # Rendered as a literal, never a parameter: the planner must see ``status = 'todo'`` to
    # use the partial indexes, also in a prepared statement's generic plan.
    return sa.literal_column(f"'{status.value}'", sa.Text)


TODO, DOING = _status(Status.TODO), _status(Status.DOING)
SUCCEEDED, FAILED = _status(Status.SUCCEEDED), _status(Status.FAILED)
CANCELLED, ABORTED = _status(Status.CANCELLED), _status(Status.ABORTED)
BLOCKED = _status(Status.BLOCKED)
#: The statuses that settle a parent's edges (its children's ``pending_parents``).
ENDED = (SUCCEEDED, FAILED, CANCELLED, ABORTED)
#: ``configure(depends_on=..., on_parent_failure=...)``: what a child does when a parent
#: ends failed, cancelled or aborted: ``cancel`` it (and its own blocked descendants), let it
#: ``run`` (the edge counts as settled), or ``hold`` it blocked until the parent is retried.
OnParentFailure = Literal["cancel", "run", "hold"]
ON_PARENT_FAILURE: tuple[OnParentFailure, ...] = ("cancel", "run", "hold")
_CANCEL_EDGE = sa.literal_column("'cancel'", sa.Text)
_RUN_EDGE = sa.literal_column("'run'", sa.Text)
_HOLD_EDGE = sa.literal_column("'hold'", sa.Text)
#: A batch's ``on_failure`` callback: the edge settles whatever the parent's end, and the
#: callback, once every edge settled, runs only if a parent did not succeed (else it ends
#: ``cancelled``). Internal: ``configure()`` does not offer it.
_FAILURE_EDGE = sa.literal_column("'failure'", sa.Text)
#: The error of a child cancelled because a parent ended badly (a literal: see below).
_PARENT_FAILED: sa.ColumnElement[Any] = sa.literal_column(
    "'{}'::jsonb".format(
        json.dumps(
            {
                "type": "ParentFailed",
                "message": "a job it depends on ended failed, cancelled or aborted",
            }
        ).replace("'", "''")
    )
)
_PARENT_FAILED_TYPE: sa.ColumnElement[str] = sa.literal_column("'ParentFailed'", sa.Text)
ONE_SECOND: sa.ColumnElement[Any] = sa.literal_column("interval '1 second'")
#: An outcome of ``raise Snooze(...)`` (see ``complete_snoozing``); never a job's status.
SNOOZED_OUTCOME: sa.ColumnElement[str] = sa.literal_column(f"'{SNOOZED}'", sa.Text)
#: The error of the snooze past the bound. A literal (quotes doubled), not a parameter: the
#: completion runs on the driver with its own parameters only.
_SNOOZED_TOO_OFTEN: sa.ColumnElement[Any] = sa.literal_column(
    "'{}'::jsonb".format(
        json.dumps(
            {
                "type": "SnoozeLimit",
                "message": f"the job snoozed {MAX_SNOOZES} times (the most a job may)",
            }
        ).replace("'", "''")
    )
)
_MAX_SNOOZES = sa.literal_column(str(MAX_SNOOZES), sa.Integer)

#: The NOTIFY of jobs that ended names them in at most this many bytes (PostgreSQL refuses a
#: payload of 8000 or more); past it, :data:`DONE_MANY` says "many ended: re-read".
DONE_PAYLOAD_MAX = 7999
#: The payload on the done channel when the ids would not fit.
DONE_MANY = "*"
_DONE_MANY: sa.ColumnElement[str] = sa.literal_column(f"'{DONE_MANY}'", sa.Text)

#: A control of jobs, by one id or in bulk (``retry_many``, ...).
Action = Literal["retry", "cancel", "abort", "delete"]

#: The statuses each control acts on: the one truth of its statement by id, its bulk form and
#: its preview (``dry_run``). Delete takes every status but ``doing``: a running job is
#: aborted, never deleted under its worker.
ACTS_ON: dict[Action, tuple[Status, ...]] = {
    "retry": (Status.FAILED, Status.ABORTED, Status.CANCELLED),
    "cancel": (Status.TODO, Status.BLOCKED),
    "abort": (Status.TODO, Status.BLOCKED, Status.DOING),
    "delete": tuple(s for s in Status if s is not Status.DOING),
}


@dataclass(slots=True)
class Query(Generic[T]):
    """A statement, its parameters and the pure mapping of its result: what a twin runs.

    Not frozen, though never changed once made: one is made per statement run, and a frozen
    dataclass sets each field through ``object.__setattr__`` (it showed in a single enqueue).

    The mapper gets the statement's :data:`Rows`, whoever ran it (typed: a mapper written
    against a SQLAlchemy ``Result`` does not type-check).
    """

    statement: Executable
    params: dict[str, Any]
    mapper: Callable[[Rows], T]
    #: Has a driver form: safe to run as compiled SQL straight on the driver connection (the
    #: enqueue fast path, the worker's dedicated connections, which run nothing else): its
    #: parameters need no SQLAlchemy bind processing.
    driver: bool = False


def _due(at: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """Due now: not scheduled, or scheduled at or before the statement's time."""
    return sa.or_(at.is_(None), at <= sa.func.now())


# -- rows written by other means (plain SQL, an older pgtq, a restored dump) -----------------
# ``defer`` validates what it writes; these keep what it did not write from breaking a claim
# or a read.

#: The largest ``lock`` or ``concurrency_key``, in bytes as PostgreSQL stores it (compressed or
#: not: ``pg_column_size``), that fits an entry of their btree indexes: 2704 bytes a btree entry
#: on 8 kB pages (version 4), less its 8-byte header and the value's 4-byte length (measured:
#: 2692 random bytes fit, 2693 do not). The claim writes such a key into
#: ``jobs_lock_doing_idx`` / ``jobs_key_doing_idx``; a longer one makes the whole claim fail
#: ("index row size … exceeds btree version 4 maximum 2704"), so :func:`fail_unclaimable_jobs`
#: fails its job instead. ``defer`` caps keys well below this.
INDEXED_VALUE_LIMIT = 2692

#: Arguments nested deeper than this are failed by :func:`fail_unclaimable_jobs`: Python's JSON
#: decoder recurses once a level (``RecursionError`` near 1000, less the caller's own stack),
#: and it decodes the claim's reply. ``defer`` caps nesting well below this.
MAX_JSON_DEPTH = 500

#: The times a read returns are within these bounds: a stored time outside them (``±infinity``,
#: or a year Python's ``datetime`` cannot hold) is read as the nearest bound, one day inside
#: Python's range so that no session time zone can push it out.
READ_TIME_MIN = datetime(1, 1, 2, tzinfo=UTC)
READ_TIME_MAX = datetime(9999, 12, 30, tzinfo=UTC)


def _time_literal(at: datetime) -> sa.ColumnElement[datetime]:
    # A literal, never a parameter: the read statements stay parameter-for-parameter the same.
    return sa.literal_column(f"timestamptz '{at.isoformat()}'", sa.DateTime(timezone=True))


def _opaque(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
    """``condition`` as a CASE, which the planner derives no index condition from: for a
    status test on rows found by primary key (a partial index on the status would have it
    read every job of that status instead)."""
    return sa.case((condition, sa.true()), else_=sa.false())


def _text_literal(text: str) -> sa.ColumnElement[str]:
    """A constant text in the SQL itself (typed, so ``format`` / ``jsonb_build_object`` know it)."""
    return sa.literal_column("'" + text.replace("'", "''") + "'", sa.Text)


def _readable(at: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``at`` clamped to [READ_TIME_MIN, READ_TIME_MAX] (NULL stays NULL): both drivers can
    read it (psycopg refuses ``-infinity``, asyncpg gives naive ``datetime.min`` / ``max``)."""
    low, high = _time_literal(READ_TIME_MIN), _time_literal(READ_TIME_MAX)
    return sa.case((at < low, low), (at > high, high), else_=at)


def _due_since(jobs: sa.Table) -> sa.ColumnElement[Any]:
    """When a job became due: its ``scheduled_at``, else (not scheduled, or scheduled at
    ``±infinity`` by a row written outside pgtq) its ``created_at``; NULL if that is not finite
    either. Never infinite, so ``now() - _due_since(...)`` cannot fail ("cannot subtract
    infinite timestamps"). One CASE: it is in the claim's RETURNING."""
    at, created = jobs.c.scheduled_at, jobs.c.created_at
    return sa.case((sa.func.isfinite(at), at), (sa.func.isfinite(created), created))


def _same_lengths(what: str, arrays: Mapping[str, Any]) -> None:
    """Parallel arrays must be parallel: ``unnest`` pads a shorter one with NULLs, which
    would write a row with columns that belong to no job. A few ``len`` calls a statement."""
    lengths = {name: len(value) for name, value in arrays.items() if isinstance(value, list)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: its arrays differ in length: {lengths}")


def _array(name: str, item: sa.types.TypeEngine[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=ARRAY(item))


def _id_list(rows: Rows) -> list[int]:
    return sorted(row[0] for row in rows)


def _one_or_none(rows: Rows) -> Any:
    """The first column of the first row, None without a row."""
    return rows[0][0] if rows else None


def _no_value(_rows: Rows) -> None:
    return None


def _count(rows: Rows) -> int:
    """How many rows the statement returned: a write's count comes from its RETURNING."""
    return len(rows)


#: The columns ``defer`` writes (``args`` and ``trace_context`` are JSON text, cast to jsonb
#: in the statements).
INSERT_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("queue", sa.Text()),
    ("task_name", sa.Text()),
    ("args", sa.Text()),
    ("priority", sa.Integer()),
    ("scheduled_at", sa.DateTime(timezone=True)),
    ("lock", sa.Text()),
    ("queueing_lock", sa.Text()),
    ("concurrency_key", sa.Text()),
    ("trace_context", sa.Text()),
)


JSON_COLUMNS = frozenset({"args", "trace_context"})

#: How ``insert_each`` writes a row (one CTE each): a plain insert, or with a
#: ``queueing_lock`` that keeps or replaces the job holding it, among waiting jobs or per
#: period (``unique_for``). Also the order of its CTEs.
EachMode = Literal["plain", "keep", "replace", "keep_period", "replace_period"]
EACH_MODES: tuple[EachMode, ...] = ("plain", "keep", "replace", "keep_period", "replace_period")
#: The fields of a row of ``insert_each``'s JSON array (``jsonb_to_recordset``'s columns):
#: ``n`` is its position, ``mode`` one of :data:`EACH_MODES`; a field left out is NULL.
EACH_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("n", sa.Integer()),
    ("mode", sa.Text()),
    ("queue", sa.Text()),
    ("priority", sa.Integer()),
    ("scheduled_at", sa.DateTime(timezone=True)),
    ("schedule_in", sa.Float()),
    ("lock", sa.Text()),
    ("queueing_lock", sa.Text()),
    ("concurrency_key", sa.Text()),
    ("unique_for", sa.Float()),
    ("tags", ARRAY(sa.Text())),
    ("meta", JSONB()),
    ("timeout", sa.Float()),
    ("max_attempts", sa.Integer()),
    ("args", JSONB()),
)
#: The fields of a row of ``insert_workflow``'s jobs (``n``: its position in the workflow).
WORKFLOW_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("n", sa.Integer()),
    ("task_name", sa.Text()),
    ("queue", sa.Text()),
    ("priority", sa.Integer()),
    ("scheduled_at", sa.DateTime(timezone=True)),
    ("schedule_in", sa.Float()),
    ("lock", sa.Text()),
    ("concurrency_key", sa.Text()),
    ("tags", ARRAY(sa.Text())),
    ("meta", JSONB()),
    ("timeout", sa.Float()),
    ("max_attempts", sa.Integer()),
    ("args", JSONB()),
    # Parents that are no job: a batch's record waits for its close (``held`` 1).
    ("held", sa.Integer()),
)
#: The fields of an edge of ``insert_workflow``: its child a position (``child``) or an
#: existing blocked job (``child_id``: a batch's callback), its parent a position
#: (``parent``) or an existing job (``parent_id``).
EDGE_COLUMNS: tuple[tuple[str, sa.types.TypeEngine[Any]], ...] = (
    ("child", sa.Integer()),
    ("parent", sa.Integer()),
    ("parent_id", sa.BigInteger()),
    ("child_id", sa.BigInteger()),
    ("on_parent_failure", sa.Text()),
)
#: The task name of a batch's own record (``app.batch``): a job no worker runs, blocked
#: while the batch is open, ``succeeded`` once closed (``cancelled`` if its block raised).
BATCH_TASK = "pgtq.batch"
#: What ``on_conflict="replace"`` changes of the job holding the key: the new job's
#: arguments, schedule and priority (as ``insert_keyed`` does), and those of its tags, meta,
#: timeout and max_attempts it has (the holder keeps its own where the new job has none).
REPLACED = ("args", "scheduled_at", "priority")
REPLACED_IF_GIVEN = ("tags", "meta", "timeout", "max_attempts")


def new_param(column: str) -> str:
    """The parameter that carries a new row's ``column`` (never the column's own name: see
    the module's docstring)."""
    return "new_" + column


class Statements:
    """The statements of one schema. Built lazily, once per schema."""

    def __init__(self, tables: Tables) -> None:
        self.t = tables
        self.jobs = tables.jobs
        self.channel = notify_channel(tables.schema)
        self.abort_channel = self.channel + "_abort"
        #: Where jobs that ended are announced (:meth:`_announce_done`): what waiters hear.
        self.done_channel = self.channel + "_done"
        self._claims: dict[tuple[str, int, bool], Claim] = {}
        self._completions: dict[tuple[bool, Rare, bool], Any] = {}
        self._keyed: dict[Conflict, sa.Select[Any]] = {}
        self._each: dict[tuple[EachMode, ...], sa.Select[Any]] = {}

    # -- enqueue ---------------------------------------------------------------------------

    @cached_property
    def insert_jobs(self) -> sa.Select[Any]:
        return self._insert_jobs(None)

    def insert_keyed(self, conflict: Conflict) -> sa.Select[Any]:
        """``insert_jobs`` of a job with a key: the job holding it (a waiting one with the
        same ``queueing_lock``, or with ``conflict.per_period`` any job of the key's current
        period that did not fail or was not cancelled) is kept, and its id comes back with
        ``fresh`` false. With ``conflict.replace``, the job holding it takes the new job's
        arguments, schedule and priority if it is a waiting job of the same task (a
        debounce), else no row comes back. Built once per variant."""
        found = self._keyed.get(conflict)
        if found is None:
            found = self._keyed[conflict] = self._insert_jobs(conflict)
        return found

    def _insert_jobs(self, conflict: Conflict | None) -> sa.Select[Any]:
        """Insert the jobs of one ``defer`` or ``defer_many`` call: the options they share as
        scalars, their arguments as one JSON array that PostgreSQL splits. One JSON text is
        encoded in one call and sent as one value: a thousand jobs go in ~30 % faster than
        as an array of a thousand texts, and a single job as fast as with ``VALUES``, so one
        statement serves both.

        The statement announces its jobs itself: one ``pg_notify(channel, queue)`` when they
        are due (all jobs of a call share their queue and schedule), sent at commit, so a job
        deferred in the caller's transaction wakes the workers only once it is visible. An
        insert trigger with a transition table did this before (pgtq_0006 drops it): it cost
        ~60 µs of a ~400 µs single enqueue here (``python -m benchmarks.probes enqueue``).

        The schedule is ``:scheduled_at`` (an instant the caller gave), else ``now() +
        :schedule_in`` seconds: a delay counts on the server's clock, the one the claim
        compares with, never on the client's.
        """
        j = self.jobs
        rows = (
            sa.func.jsonb_array_elements(
                sa.cast(sa.bindparam(new_param("args"), type_=sa.Text), JSONB)
            )
            .table_valued(sa.column("value", JSONB))
            .render_derived("new_jobs")
        )
        delay = sa.bindparam("schedule_in", type_=sa.Float)
        at = sa.func.coalesce(
            sa.bindparam(new_param("scheduled_at"), type_=sa.DateTime(timezone=True)),
            sa.func.now() + delay * ONE_SECOND,
            type_=sa.DateTime(timezone=True),
        )
        values: list[sa.ColumnElement[Any]] = []
        per_period = conflict is not None and conflict.per_period
        for name, kind in INSERT_COLUMNS:
            value = (
                rows.c.value
                if name == "args"
                else at
                if name == "scheduled_at"
                else sa.null()
                if name == "queueing_lock" and per_period  # the key goes to unique_key
                else sa.bindparam(new_param(name), type_=kind)
            )
            values.append(sa.cast(value, JSONB) if name == "trace_context" else value)
        columns = [name for name, _ in INSERT_COLUMNS]
        if per_period:  # the key and the period it falls in, on the server's clock
            period = sa.func.floor(
                sa.func.extract("epoch", sa.func.now()) / sa.bindparam("unique_for", type_=sa.Float)
            )
            key = sa.bindparam(new_param("queueing_lock"), type_=sa.Text)
            values.append(
                key + sa.literal("@", sa.Text) + sa.cast(sa.cast(period, sa.BigInteger), sa.Text)
            )
            columns.append("unique_key")
        select = sa.select(*values).select_from(rows)
        queue = sa.bindparam(new_param("queue"), type_=sa.Text)
        if conflict is None:
            inserted = sa.insert(j).from_select(columns, select).returning(j.c.id).cte("inserted")
            return self._announce(inserted, queue, at)
        # A job with a queueing_lock: ON CONFLICT against the waiting job holding the key, which
        # it returns (the update is what makes RETURNING give an existing row, also one
        # committed after this statement's snapshot), with whether the row is new.
        upsert = pg_insert(j).from_select(columns, select)
        new = upsert.excluded
        key_column = "unique_key" if per_period else "queueing_lock"
        changes: dict[str, Any] = (
            {"args": new.args, "scheduled_at": new.scheduled_at, "priority": new.priority}
            if conflict.replace
            else {key_column: new[key_column]}
        )
        keyed = upsert.on_conflict_do_update(
            index_elements=[key_column],
            index_where=sa.text(UNIQUE_KEY_HELD if per_period else QUEUEING_LOCK_HELD),
            set_=changes,
            # Replace only a waiting job of the same task: a key is unique across tasks, and
            # a job of the period may have run already.
            where=(
                sa.and_(j.c.task_name == new.task_name, j.c.status == TODO)
                if conflict.replace
                else None
            ),
        )
        fresh = sa.literal_column("xmax = '0'::xid", sa.Boolean).label("fresh")
        inserted = keyed.returning(j.c.id, fresh).cte("inserted")
        kept_only = None if conflict.replace else inserted.c.fresh
        return self._announce(inserted, queue, at, inserted.c.fresh, announced_if=kept_only)

    @cached_property
    def insert_workflow(self) -> sa.Select[Any]:
        """Insert the jobs of a workflow and their dependencies, in one statement: one JSON
        row a job (``:new_jobs``, each with its own task and options, ``n`` its position),
        one an edge (``:new_edges``: ``child`` a position, its parent a position ``parent``
        or an existing job ``parent_id``, and ``on_parent_failure``). The new jobs' ids are
        taken from the ids' sequence first (in position order), so edges between new jobs
        are written with them.

        A job with parents not all settled is inserted ``blocked`` with ``pending_parents``
        counted; the others ``todo``. An existing parent gets ``children`` raised (its row
        locked: a completion of it waits, then sees ``children`` set and settles through the
        releasing variant; its status read after the lock is the one counted). An existing
        parent already succeeded is settled, one failed, cancelled or aborted too on a
        ``run`` edge, and otherwise left pending: the child waits for the parent's retry.
        If a parent id names no job, nothing is written (no row comes back).

        ``workflow_id``: the existing parents' workflow (the smallest), else the first
        parent's id, else the first new job's id; a parent of no workflow joins it.
        Announces its due ``todo`` jobs, one NOTIFY per queue. Selects the new ids in
        position order."""
        j, e = self.jobs, self.t.job_dependencies
        rows = (
            sa.select(
                sa.func.jsonb_to_recordset(sa.cast(sa.bindparam("new_jobs", type_=sa.Text), JSONB))
                .table_valued(*(sa.column(name, kind) for name, kind in WORKFLOW_COLUMNS))
                .render_derived("each_row", with_types=True)
            )
        ).cte("new_rows")
        edges = (
            sa.select(
                sa.func.jsonb_to_recordset(sa.cast(sa.bindparam("new_edges", type_=sa.Text), JSONB))
                .table_valued(*(sa.column(name, kind) for name, kind in EDGE_COLUMNS))
                .render_derived("each_edge", with_types=True)
            )
        ).cte("new_edges")
        sequence = sa.func.pg_get_serial_sequence(
            _text_literal(f'"{self.t.schema}".jobs'), _text_literal("id")
        )
        ids = (
            sa.select(rows.c.n, sa.func.nextval(sequence).label("id"))
            .order_by(rows.c.n)
            .cte("new_ids")
            .prefix_with("MATERIALIZED")
        )
        outside = sa.select(edges.c.parent_id).where(edges.c.parent_id.is_not(None))
        wanted = sa.select(sa.func.count(sa.distinct(edges.c.parent_id))).scalar_subquery()
        present = (
            sa.select(sa.func.count()).select_from(j).where(j.c.id.in_(outside)).scalar_subquery()
        )
        targets = sa.select(edges.c.child_id).where(edges.c.child_id.is_not(None))
        expected = sa.select(sa.func.count(sa.distinct(edges.c.child_id))).scalar_subquery()
        waiting = (
            sa.select(sa.func.count())
            .select_from(j)
            .where(j.c.id.in_(targets), j.c.status == BLOCKED)
            .scalar_subquery()
        )
        # A batch's member: the batch still open (its record blocked, locked for share: a
        # close waits for this insert, or this insert sees the batch closed).
        batch = sa.bindparam("open_batch", type_=sa.BigInteger)
        batch_open = (
            sa.select(j.c.id)
            .where(j.c.id == batch, j.c.status == BLOCKED)
            .with_for_update(read=True)
            .cte("batch_open")
        )
        ok = sa.select(
            sa.and_(
                present == wanted,
                waiting == expected,
                sa.or_(batch.is_(None), sa.exists(sa.select(batch_open.c.id))),
            ).label("ok")
        ).cte("parents_found")
        per_parent = (
            sa.select(edges.c.parent_id, sa.func.count().label("n"))
            .where(edges.c.parent_id.is_not(None))
            .group_by(edges.c.parent_id)
            .subquery("per_parent")
        )
        all_found = sa.select(ok.c.ok).scalar_subquery()
        # The workflow: the existing parents' (named by its first job), else the first new
        # job's id; parents of none join it.
        first_id = sa.select(sa.func.min(ids.c.id)).scalar_subquery()
        workflow = (
            sa.select(
                sa.func.coalesce(sa.func.min(sa.func.coalesce(j.c.workflow_id, j.c.id)), first_id)
            )
            .where(sa.or_(j.c.id.in_(outside), j.c.id.in_(targets)))
            .cte("workflow")
        )
        workflow_id = sa.select(workflow.c[0]).scalar_subquery()
        marked = (
            sa.update(j)
            .where(j.c.id == per_parent.c.parent_id, all_found)
            .values(
                children=sa.func.coalesce(j.c.children, 0) + per_parent.c.n,
                workflow_id=sa.func.coalesce(j.c.workflow_id, workflow_id),
            )
            .returning(j.c.id, j.c.status)
            .cte("marked")
        )
        # A batch's callbacks (existing blocked jobs) wait for one more parent each.
        per_target = (
            sa.select(edges.c.child_id, sa.func.count().label("n"))
            .where(edges.c.child_id.is_not(None))
            .group_by(edges.c.child_id)
            .subquery("per_target")
        )
        # (Nothing reads it: added to the statement, it runs all the same.)
        attached = (
            sa.update(j)
            .where(j.c.id == per_target.c.child_id, j.c.status == BLOCKED, all_found)
            .values(pending_parents=j.c.pending_parents + per_target.c.n)
            .returning(j.c.id)
            .cte("attached")
        )
        child_ids = ids.alias("child_ids")
        parent_ids = ids.alias("parent_ids")
        failed = marked.c.status.in_([FAILED, CANCELLED, ABORTED])
        settled = sa.or_(
            marked.c.status == SUCCEEDED,
            sa.and_(edges.c.on_parent_failure == _RUN_EDGE, failed),
        )
        links = (
            sa.select(
                sa.func.coalesce(child_ids.c.id, edges.c.child_id).label("child_id"),
                sa.func.coalesce(parent_ids.c.id, edges.c.parent_id).label("parent_id"),
                edges.c.on_parent_failure,
                sa.case((edges.c.parent_id.is_(None), sa.true()), else_=~settled).label("pending"),
            )
            .select_from(
                edges.outerjoin(child_ids, child_ids.c.n == edges.c.child)
                .outerjoin(parent_ids, parent_ids.c.n == edges.c.parent)
                .outerjoin(marked, marked.c.id == edges.c.parent_id)
            )
            .cte("links")
        )
        linked = (
            sa.insert(e)
            .from_select(
                ["child_id", "parent_id", "on_parent_failure"],
                sa.select(links.c.child_id, links.c.parent_id, links.c.on_parent_failure).where(
                    all_found
                ),
            )
            .returning(e.c.child_id)
            .cte("linked")
        )
        pending = (
            sa.select(
                links.c.child_id,
                sa.func.count().filter(links.c.pending).label("n"),
            )
            .group_by(links.c.child_id)
            .subquery("pending")
        )
        fan_out = (
            sa.select(edges.c.parent, sa.func.count().label("n"))
            .where(edges.c.parent.is_not(None))
            .group_by(edges.c.parent)
            .subquery("fan_out")
        )
        r = rows.c
        waits_for = sa.case(
            (r.held.is_(None), pending.c.n), else_=sa.func.coalesce(pending.c.n, 0) + r.held
        )
        blocked = sa.func.coalesce(waits_for, 0) > 0
        values: dict[str, sa.ColumnElement[Any]] = {
            "id": ids.c.id,
            "queue": r.queue,
            "task_name": r.task_name,
            "args": r.args,
            "priority": r.priority,
            "scheduled_at": sa.func.coalesce(
                r.scheduled_at,
                sa.func.now() + r.schedule_in * ONE_SECOND,
                type_=sa.DateTime(timezone=True),
            ),
            "lock": r.lock,
            "concurrency_key": r.concurrency_key,
            "trace_context": sa.cast(
                sa.bindparam(new_param("trace_context"), type_=sa.Text), JSONB
            ),
            "tags": r.tags,
            "meta": r.meta,
            "timeout": r.timeout,
            "max_attempts": r.max_attempts,
            "status": sa.case((blocked, BLOCKED), else_=TODO),
            "pending_parents": waits_for,
            "children": fan_out.c.n,
            "workflow_id": workflow_id,
        }
        select = (
            sa.select(*values.values())
            .select_from(
                rows.join(ids, ids.c.n == r.n)
                .outerjoin(pending, pending.c.child_id == ids.c.id)
                .outerjoin(fan_out, fan_out.c.parent == r.n)
            )
            .where(all_found)
            .order_by(r.n)
        )
        inserted = (
            sa.insert(j)
            .from_select(list(values), select)
            .returning(j.c.id, j.c.queue, j.c.status, j.c.scheduled_at)
            .cte("inserted")
        )
        due = sa.and_(inserted.c.status == TODO, _due(inserted.c.scheduled_at))
        payload = (
            _text_literal("#")
            + sa.cast(sa.func.min(inserted.c.id), sa.Text)
            + _text_literal(":")
            + sa.cast(sa.func.count(), sa.Text)
            + _text_literal(" ")
            + inserted.c.queue
        )
        notified = (
            sa.select(sa.func.pg_notify(self._channel, payload).label("sent"))
            .where(due)
            .group_by(inserted.c.queue)
            .cte("notified")
        )
        announced = (
            sa.select(sa.func.count().label("sent"))
            .select_from(notified)
            .cte("announced")
            .prefix_with("MATERIALIZED")
        )
        edges_written = (
            sa.select(sa.func.count().label("edges"))
            .select_from(linked)
            .cte("edges_written")
            .prefix_with("MATERIALIZED")
        )
        return (
            sa.select(inserted.c.id, inserted.c.status)
            .select_from(
                inserted.outerjoin(announced, sa.true()).outerjoin(edges_written, sa.true())
            )
            .order_by(inserted.c.id)
            .add_cte(attached)
        )

    @cached_property
    def close_batch(self) -> sa.Select[Any]:
        """Close the batch ``:batch_id``: its record ``blocked → succeeded`` (``cancelled``
        with ``:batch_failed``, a block that raised), which settles its callbacks' last
        edge in the same statement (:meth:`_settling`). Selects its id if it was open."""
        j = self.jobs
        failed = sa.bindparam("batch_failed", type_=sa.Boolean)
        changed = (
            sa.update(j)
            .where(
                j.c.id == sa.bindparam("batch_id", type_=sa.BigInteger),
                j.c.task_name == _text_literal(BATCH_TASK),
                j.c.status == BLOCKED,
            )
            .values(
                status=sa.case((failed, CANCELLED), else_=SUCCEEDED),
                finished_at=sa.func.now(),
                pending_parents=0,
            )
            .returning(j.c.id, j.c.status, j.c.children)
            .cte("changed")
        )
        return self._settled_after(changed, sa.select(changed.c.id))

    @cached_property
    def parent_results(self) -> sa.Select[Any]:
        """The parents of ``:job_id`` with their status and result, in id order."""
        j, e = self.jobs, self.t.job_dependencies
        return (
            sa.select(j.c.id, j.c.status, j.c.result)
            .select_from(e.join(j, j.c.id == e.c.parent_id))
            .where(
                e.c.child_id == sa.bindparam("job_id", type_=sa.BigInteger),
                j.c.task_name != _text_literal(BATCH_TASK),
            )
            .order_by(j.c.id)
        )

    @cached_property
    def dependencies(self) -> sa.Select[Any]:
        """The edges of ``:job_id``, both ways: ``(kind, other id, other's task, other's
        status, on_parent_failure)``, ``kind`` ``parent`` or ``child``, in id order."""
        j, e = self.jobs, self.t.job_dependencies
        me = sa.bindparam("job_id", type_=sa.BigInteger)
        parents = (
            sa.select(
                _text_literal("parent").label("kind"),
                j.c.id,
                j.c.task_name,
                j.c.status,
                e.c.on_parent_failure,
            )
            .select_from(e.join(j, j.c.id == e.c.parent_id))
            .where(e.c.child_id == me)
        )
        children = (
            sa.select(
                _text_literal("child"),
                j.c.id,
                j.c.task_name,
                j.c.status,
                e.c.on_parent_failure,
            )
            .select_from(e.join(j, j.c.id == e.c.child_id))
            .where(e.c.parent_id == me)
        )
        both = sa.union_all(parents, children).subquery("edges")
        return sa.select(*both.c).order_by(both.c.kind.desc(), both.c.id)

    @cached_property
    def workflow_edges(self) -> sa.Select[Any]:
        """The edges among the jobs of workflow ``:only_workflow``: ``(parent, child)``."""
        j, e = self.jobs, self.t.job_dependencies
        return (
            sa.select(e.c.parent_id, e.c.child_id)
            .select_from(e.join(j, j.c.id == e.c.child_id))
            .where(j.c.workflow_id == sa.bindparam("only_workflow", type_=sa.BigInteger))
            .order_by(e.c.child_id, e.c.parent_id)
        )

    def insert_each(self, modes: tuple[EachMode, ...]) -> sa.Select[Any]:
        """Insert jobs that each have their own options (a per-job ``defer_many``, or a
        ``configure()`` with tags, meta, timeout or max_attempts): one row a job in one JSON
        array (``:new_jobs``, split by ``jsonb_to_recordset``), and one data-modifying CTE
        per way of writing present in it (``modes``, in :data:`EACH_MODES` order): plain
        inserts, keyed ones that keep the job holding the key, keyed ones that replace it,
        and both per period (``unique_key``). Built once per set of modes.

        No keyed row fails: the job holding its key always comes back, new (``fresh``), kept,
        or given this row's arguments, schedule, priority, tags, meta, timeout and
        max_attempts (``replaced``) when it is a waiting job of the same task (the update
        writes every column back as it was otherwise, so that its row still comes back). The
        caller sends each key at most once (:class:`EachJobs`): no two CTEs touch one row.

        It announces what it wrote itself: one NOTIFY per queue among its new and replaced
        jobs (not among kept ones), in ``_announce``'s format with the queue's own count,
        first id and earliest schedule."""
        found = self._each.get(modes)
        if found is None:
            found = self._each[modes] = self._insert_each(modes)
        return found

    def _insert_each(self, modes: tuple[EachMode, ...]) -> sa.Select[Any]:
        recordset = (
            sa.func.jsonb_to_recordset(sa.cast(sa.bindparam("new_jobs", type_=sa.Text), JSONB))
            .table_valued(*(sa.column(name, kind) for name, kind in EACH_COLUMNS))
            .render_derived("each_row", with_types=True)
        )
        rows = sa.select(recordset).cte("new_rows")
        written = [self._write_each(rows, mode) for mode in modes]
        union = (written[0] if len(written) == 1 else sa.union_all(*written)).cte("written")
        return self._announce_each(union)

    def _write_each(self, rows: sa.CTE, mode: EachMode) -> sa.Select[Any]:
        """The CTE writing ``insert_each``'s rows of one mode, and what it wrote: ``kind``
        (``plain``, or the index of the key: ``lock`` / ``period``), ``id``, ``key``,
        ``fresh``, ``replaced``, ``queue``, ``scheduled_at``."""
        j, r = self.jobs, rows.c
        per_period = mode.endswith("_period")
        task_name = sa.bindparam(new_param("task_name"), type_=sa.Text)
        values: dict[str, sa.ColumnElement[Any]] = {
            "queue": r.queue,
            "task_name": task_name,
            "args": r.args,
            "priority": r.priority,
            "scheduled_at": sa.func.coalesce(
                r.scheduled_at,
                sa.func.now() + r.schedule_in * ONE_SECOND,
                type_=sa.DateTime(timezone=True),
            ),
            "lock": r.lock,
            "queueing_lock": sa.null() if per_period else r.queueing_lock,
            "concurrency_key": r.concurrency_key,
            "trace_context": sa.cast(
                sa.bindparam(new_param("trace_context"), type_=sa.Text), JSONB
            ),
            "tags": r.tags,
            "meta": r.meta,
            "timeout": r.timeout,
            "max_attempts": r.max_attempts,
        }
        if per_period:  # the key and the period it falls in, on the server's clock
            period = sa.func.floor(sa.func.extract("epoch", sa.func.now()) / r.unique_for)
            values["unique_key"] = (
                r.queueing_lock
                + _text_literal("@")
                + sa.cast(sa.cast(period, sa.BigInteger), sa.Text)
            )
        select = sa.select(*values.values()).where(r.mode == _text_literal(mode))
        if mode == "plain":  # ids in the order of the rows: the mapper relies on it
            insert = sa.insert(j).from_select(list(values), select.order_by(r.n))
            plain = insert.returning(j.c.id, j.c.queue, j.c.scheduled_at).cte("inserted_plain")
            return sa.select(
                _text_literal("plain").label("kind"),
                plain.c.id,
                sa.cast(sa.null(), sa.Text).label("key"),
                sa.true().label("fresh"),
                sa.false().label("replaced"),
                plain.c.queue,
                plain.c.scheduled_at,
            )
        # Keys in one order: two batches sharing keys wait on each other's in that order,
        # never each on the other (no deadlock while each key takes the same mode in both).
        upsert = pg_insert(j).from_select(list(values), select.order_by(r.queueing_lock))
        new = upsert.excluded
        key_column = "unique_key" if per_period else "queueing_lock"
        replaced: sa.ColumnElement[bool] = sa.false()
        changes: dict[str, Any] = {key_column: new[key_column]}  # keep: lock it, change nothing
        if mode.startswith("replace"):
            # Every column written, as it was unless the holder is a waiting job of this
            # task: the row comes back whatever it is (no WHERE that would hide it).
            mine = sa.and_(j.c.task_name == new.task_name, j.c.status == TODO)
            changes = {c: sa.case((mine, new[c]), else_=j.c[c]) for c in REPLACED}
            changes.update(
                (c, sa.case((mine, sa.func.coalesce(new[c], j.c[c])), else_=j.c[c]))
                for c in REPLACED_IF_GIVEN
            )
            replaced = sa.and_(
                sa.literal_column("xmax <> '0'::xid", sa.Boolean),
                j.c.task_name == task_name,
                j.c.status == TODO,
            )
        keyed = (
            upsert.on_conflict_do_update(
                index_elements=[key_column],
                index_where=sa.text(UNIQUE_KEY_HELD if per_period else QUEUEING_LOCK_HELD),
                set_=changes,
            )
            .returning(
                j.c.id,
                j.c[key_column].label("key"),
                sa.literal_column("xmax = '0'::xid", sa.Boolean).label("fresh"),
                replaced.label("replaced"),
                j.c.queue,
                j.c.scheduled_at,
            )
            .cte(f"inserted_{mode}")
        )
        kind = "period" if per_period else "lock"
        return sa.select(_text_literal(kind).label("kind"), *keyed.c)

    def _announce_each(self, written: sa.CTE) -> sa.Select[Any]:
        """Select what ``insert_each`` wrote, with one NOTIFY per queue of its new and
        replaced jobs: ``#<first due id>:<due count> <queue>`` when some are due, else
        ``@<seconds until the earliest> <queue>`` (the payloads of ``_announce``)."""
        w = written.c
        due = _due(w.scheduled_at)
        count = sa.func.count().filter(due)
        named = (
            _text_literal("#")
            + sa.cast(sa.func.min(w.id).filter(due), sa.Text)
            + _text_literal(":")
            + sa.cast(count, sa.Text)
        )
        until = sa.func.extract("epoch", sa.func.min(w.scheduled_at) - sa.func.now())
        payload = (
            sa.case(
                (count > sa.literal_column("0", sa.Integer), named),
                else_=_text_literal("@") + sa.cast(until, sa.Text),
            )
            + _text_literal(" ")
            + w.queue
        )
        notified = (
            sa.select(sa.func.pg_notify(self._channel, payload).label("sent"))
            .where(sa.or_(w.fresh, w.replaced))
            .group_by(w.queue)
            .cte("notified")
        )
        # Counts what was sent, so that ``notified`` runs to its end; one row, so that no
        # row of ``written`` doubles. Materialized: inlined, its join (one row, no column
        # read) would be removed by the planner, and no NOTIFY sent.
        announced = (
            sa.select(sa.func.count().label("sent"))
            .select_from(notified)
            .cte("announced")
            .prefix_with("MATERIALIZED")
        )
        return sa.select(w.kind, w.id, w.key, w.fresh, w.replaced).select_from(
            written.outerjoin(announced, sa.true())
        )

    @property
    def _channel(self) -> sa.ColumnElement[str]:
        """The jobs' channel as a literal (a validated identifier: safe in the SQL text)."""
        return sa.literal_column(f"'{self.channel}'", sa.Text)

    def _announce(
        self,
        inserted: sa.CTE,
        queue: sa.ColumnElement[str],
        at: sa.ColumnElement[Any],
        *more: sa.ColumnElement[Any],
        announced_if: sa.ColumnElement[bool] | None = None,
    ) -> sa.Select[Any]:
        """Select the inserted ids, sending one NOTIFY on the jobs' channel (``at``: their
        schedule, the same expression they were inserted with). When they are due its payload
        names them, ``#<first id>:<count> <queue>``, so idle workers answer by turns
        (:mod:`pgtq.turns`); else it is ``@<seconds until due> <queue>``, so an idle worker
        moves its wake-up earlier instead of finding them at its next poll
        (:func:`parse_announcement`). Nothing is sent when nothing was inserted."""
        until = sa.cast(sa.func.extract("epoch", at - sa.func.now()), sa.Text)

        def text(value: str) -> sa.ColumnElement[str]:
            return sa.literal(value, sa.Text)

        # Any id of the insert names it (a turn's token): the first row's, read alone rather
        # than an aggregate over every inserted row; the count is the caller's.
        ids = sa.select(inserted.c.id)
        if announced_if is not None:  # a kept duplicate wakes nobody: nothing new is due
            ids = ids.where(announced_if)
        first = ids.limit(sa.literal_column("1")).scalar_subquery()
        count = sa.bindparam(new_param("count"), type_=sa.Integer)
        named = text("#") + sa.cast(first, sa.Text) + text(":") + sa.cast(count, sa.Text)
        payload = sa.case((_due(at), named), else_=text("@") + until) + text(" ") + queue
        sent = sa.select(sa.func.pg_notify(self._channel, payload).label("sent")).where(
            first.is_not(None)
        )
        announced = sent.cte("announced")
        return sa.select(inserted.c.id, *more).select_from(inserted.outerjoin(announced, sa.true()))

    # -- claim -----------------------------------------------------------------------------

    def claim(self, queues: Sequence[str] | None, limit: int, answering: bool = False) -> Claim:
        """The claim of up to ``limit`` jobs, its limit written into the SQL; ``answering``:
        the claim that answers an announcement, calling the others if more wait
        (:meth:`_answering`).

        A parameter there would cost a new plan at every claim: PostgreSQL cannot cost a
        generic plan for ``LIMIT $n``, so it plans each execution afresh (twice the time of a
        batch-20 claim). With the number in the text, the prepared statement keeps one
        generic plan. A worker claims ``batch_size`` jobs nearly every time, so it uses one
        or a few of these statements.
        """
        kind = "all" if not queues else "one" if len(queues) == 1 else "some"
        return self._claim_variant(
            (kind, limit, answering), lambda: self._claim_statement(queues=kind, limit=limit)
        )

    def _claim_variant(
        self, key: tuple[str, int, bool], build: Callable[[], ReturningUpdate[Any]]
    ) -> Claim:
        """A claim statement, built once per key; the answering variant wraps it."""
        statement = self._claims.get(key)
        if statement is None:
            built = build()
            statement = self._claims[key] = self._answering(built) if key[2] else built
        return statement

    def _answering(self, claim: ReturningUpdate[Any]) -> sa.Select[Any]:
        """``claim``, announcing ``:queue`` again in the bare form (which every idle worker
        answers, :mod:`pgtq.turns`) when it took all it ``:asked`` for and the announcements
        it answers ``:named`` more: a burst drains on the whole fleet, not on the one worker
        whose turn it was. In the claim's own statement: no round trip more."""
        claimed = claim.cte("claimed")
        n = sa.func.count()
        more = sa.and_(
            n >= sa.bindparam("asked", type_=sa.Integer),
            n < sa.bindparam("named", type_=sa.Integer),
        )
        again = sa.func.pg_notify(self._channel, sa.bindparam("announce_queue", type_=sa.Text))
        told = sa.select(again.label("told")).select_from(claimed).having(more).cte("told")
        return sa.select(*claimed.c).select_from(claimed.outerjoin(told, sa.true()))

    @cached_property
    def announce(self) -> sa.Select[Any]:
        """Announce ``:queue`` in the bare form: every idle worker of it claims (a turn passed
        on, :mod:`pgtq.turns`)."""
        queue = sa.bindparam("announce_queue", type_=sa.Text)
        return sa.select(sa.func.pg_notify(self._channel, queue))

    def _claimable(self, queues: str) -> list[sa.ColumnElement[bool]]:
        """What makes a job claimable now: waiting, due, its lock free, its queue not paused,
        and (``one`` / ``some``) in the worker's queues."""
        j = self.jobs
        running = j.alias("running")
        lock_free = sa.or_(
            j.c.lock.is_(None),
            ~sa.exists().where(running.c.lock == j.c.lock, running.c.status == DOING),
        )
        due = _due(j.c.scheduled_at)
        q = self.t.queues
        # Paused queues: one hashed lookup per statement (the queues table is tiny).
        not_paused = j.c.queue.not_in(sa.select(q.c.name).where(q.c.paused))
        # A worker declared dead (its row removed by a rescue) claims nothing until it has
        # registered again: it may still run what was rescued from it.
        w = self.t.workers
        alive = sa.exists().where(w.c.id == sa.bindparam("me", type_=sa.Text))
        where = [j.c.status == TODO, due, lock_free, not_paused, alive]
        if queues == "one":  # equality, so the (queue, priority, id) index gives the order
            where.append(j.c.queue == sa.bindparam("only_queue", type_=sa.Text))
        elif queues == "some":
            where.append(j.c.queue == sa.any_(_array("queues", sa.Text())))
        return where

    def _take(self, picked: sa.CTE, *more: sa.ColumnElement[Any]) -> ReturningUpdate[Any]:
        """``todo → doing`` for the picked ids (in no order: ``claimed_in_order`` sorts them,
        cheaper in Python than a sort node and a CTE around the update); ``more``: columns
        returned after a ``ClaimedJob``'s."""
        j = self.jobs
        # pickup latency: from when the job was due to now (None if never finite)
        waited = sa.cast(sa.func.extract("epoch", sa.func.now() - _due_since(j)), sa.Float)
        claimed = (
            sa.update(j)
            .where(j.c.id == picked.c.id)
            .values(
                status=DOING,
                attempts=j.c.attempts + 1,
                worker_id=sa.bindparam("me", type_=sa.Text),
                # The clock, not the transaction's start: a claim that waited for the limits
                # lock starts after what it waited for (the history reads this column).
                started_at=sa.func.clock_timestamp(),
            )
            .returning(*self._claimed_columns(waited), *more)
        )
        return claimed

    def _claimed_columns(self, waited: sa.ColumnElement[Any]) -> list[sa.ColumnElement[Any]]:
        """A ``ClaimedJob``'s columns in its fields' order (it is made from the row as it
        is), ``waited`` being how its pickup latency is computed."""
        j = self.jobs
        return [
            waited.label(name) if name == "waited" else j.c[name] for name in ClaimedJob._fields
        ]

    def _claim_statement(self, *, queues: str, limit: int) -> ReturningUpdate[Any]:
        """Claim up to ``limit`` due jobs in priority order, in one statement.

        ``todo → doing``. SKIP LOCKED lets workers claim side by side; a job whose ``lock``
        has a running job is passed over, and of several jobs sharing a lock only the first
        is taken. Two workers racing for one lock are stopped by the unique index on running
        locks (the loser retries its claim).
        """
        j = self.jobs
        candidates = (
            sa.select(j.c.id, j.c.lock, j.c.priority)
            .where(*self._claimable(queues))
            .order_by(j.c.priority.desc(), j.c.id)
            .limit(sa.literal_column(str(int(limit)), sa.Integer))
            .with_for_update(skip_locked=True)
            .cte("candidates")
        )
        rank = (
            sa.func.row_number()
            .over(
                partition_by=candidates.c.lock,
                order_by=(candidates.c.priority.desc(), candidates.c.id),
            )
            .label("rank")
        )
        ranked = (
            sa.select(candidates.c.id, rank)
            .where(candidates.c.lock.is_not(None))
            .subquery("ranked")
        )
        picked = sa.union_all(
            sa.select(candidates.c.id).where(candidates.c.lock.is_(None)),
            sa.select(ranked.c.id).where(ranked.c.rank == 1),
        ).cte("picked")
        return self._take(picked)

    def claim_limited(self, queues: Sequence[str] | None, answering: bool = False) -> Claim:
        """The claim under fleet-wide limits (its limit a parameter); ``answering``: see
        :meth:`claim`."""
        kind = "some" if queues else "all"
        return self._claim_variant(
            ("limited " + kind, 0, answering), lambda: self._claim_limited_statement(queues=kind)
        )

    def _claim_limited_statement(self, *, queues: str) -> ReturningUpdate[Any]:
        """The claim under fleet-wide limits (run under the limits advisory lock).

        ``:allow_keys`` / ``:allow_n``: how many more jobs each limited task (``task:x``),
        queue (``queue:y``) and key of a task (``key:x#k``, ``pgtq.limits.key_bucket``) may
        start (from ``pgtq.limits.allowances`` / ``key_allowances``); ``:keycap_tasks`` /
        ``:keycap_n``: tasks whose jobs sharing a ``concurrency_key`` run at most n at once;
        ``:keyrate_tasks`` / ``:keyrate_n``: tasks with a ``key_rate_limit``, and the starts
        a key with no bucket allows (a full bucket). Up to ``:scan`` candidates are looked at
        to fill ``:limit`` slots. Returns a ``ClaimedJob``'s columns, then the job's
        ``concurrency_key`` (the key bucket to charge).
        """
        j = self.jobs

        def key_bucket(task: Any, key: Any) -> Any:  # pgtq.limits.key_bucket, in SQL
            return sa.literal("key:") + task + sa.literal("#") + key

        allow = (
            sa.select(
                sa.func.unnest(_array("allow_keys", sa.Text())).label("key"),
                sa.func.unnest(_array("allow_n", sa.Integer())).label("n"),
            )
        ).cte("allow")
        full = sa.select(allow.c.key).where(allow.c.n <= 0)
        task_key = sa.literal("task:") + j.c.task_name
        queue_key = sa.literal("queue:") + j.c.queue
        candidates = (
            sa.select(j.c.id, j.c.lock, j.c.priority, j.c.task_name, j.c.queue, j.c.concurrency_key)
            .where(
                *self._claimable(queues),
                task_key.not_in(full),
                queue_key.not_in(full),
                # A key whose bucket is empty: its backlog never fills the scan.
                sa.or_(
                    j.c.concurrency_key.is_(None),
                    key_bucket(j.c.task_name, j.c.concurrency_key).not_in(full),
                ),
            )
            .order_by(j.c.priority.desc(), j.c.id)
            .limit(sa.bindparam("scan", type_=sa.Integer))
            .with_for_update(skip_locked=True)
            .cte("candidates")
        )
        c = candidates.c
        order = (c.priority.desc(), c.id)

        def rank(column: Any, name: str) -> Any:
            return sa.func.row_number().over(partition_by=column, order_by=order).label(name)

        rank_task_key = (
            sa.func.row_number()
            .over(partition_by=(c.task_name, c.concurrency_key), order_by=order)
            .label("rtk")
        )

        ranked = sa.select(
            c.id,
            c.priority,
            c.lock,
            c.task_name,
            c.queue,
            c.concurrency_key,
            rank(c.task_name, "rt"),
            rank(c.queue, "rq"),
            rank(c.concurrency_key, "rk"),
            rank(c.lock, "rl"),
            rank_task_key,
        ).subquery("ranked")
        running = j.alias("running_keys")
        key_running = (
            sa.select(running.c.concurrency_key.label("key"), sa.func.count().label("n"))
            .where(running.c.status == DOING, running.c.concurrency_key.is_not(None))
            .group_by(running.c.concurrency_key)
            .subquery("key_running")
        )
        keycaps = (
            sa.select(
                sa.func.unnest(_array("keycap_tasks", sa.Text())).label("task"),
                sa.func.unnest(_array("keycap_n", sa.Integer())).label("n"),
            )
        ).subquery("keycaps")
        keyrates = (
            sa.select(
                sa.func.unnest(_array("keyrate_tasks", sa.Text())).label("task"),
                sa.func.unnest(_array("keyrate_n", sa.Integer())).label("n"),
            )
        ).subquery("keyrates")
        at, aq, ak = allow.alias("allow_task"), allow.alias("allow_queue"), allow.alias("allow_key")
        r = ranked.c
        picked = (
            sa.select(r.id)
            .select_from(
                ranked.outerjoin(at, at.c.key == sa.literal("task:") + r.task_name)
                .outerjoin(aq, aq.c.key == sa.literal("queue:") + r.queue)
                .outerjoin(keycaps, keycaps.c.task == r.task_name)
                .outerjoin(key_running, key_running.c.key == r.concurrency_key)
                .outerjoin(keyrates, keyrates.c.task == r.task_name)
                .outerjoin(ak, ak.c.key == key_bucket(r.task_name, r.concurrency_key))
            )
            .where(
                sa.or_(at.c.n.is_(None), r.rt <= at.c.n),
                sa.or_(aq.c.n.is_(None), r.rq <= aq.c.n),
                sa.or_(r.lock.is_(None), r.rl == 1),
                sa.or_(
                    r.concurrency_key.is_(None),
                    keycaps.c.n.is_(None),
                    r.rk + sa.func.coalesce(key_running.c.n, 0) <= keycaps.c.n,
                ),
                sa.or_(
                    r.concurrency_key.is_(None),
                    keyrates.c.n.is_(None),
                    r.rtk <= sa.func.coalesce(ak.c.n, keyrates.c.n),
                ),
            )
            .order_by(r.priority.desc(), r.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .cte("picked")
        )
        return self._take(picked, j.c.concurrency_key)

    def fail_unclaimable(self, by_queue: bool) -> sa.Select[Any]:
        """``todo → failed`` for the waiting jobs whose claim would fail the whole claim,
        each with an ``UnclaimableJob`` error record saying why.

        Only rows written by other means than ``defer`` can be so: a ``lock`` or
        ``concurrency_key`` too long for an entry of the index the claim writes it to (over
        :data:`INDEXED_VALUE_LIMIT` bytes as stored), an ``attempts`` count the claim cannot
        add one to, or arguments (or trace context) Python's JSON decoder refuses when the
        claim's reply is read (nested over :data:`MAX_JSON_DEPTH` levels, or an integer of
        over 4,300 digits). The row keeps its ``attempts`` (it never ran); the history reads
        the change off the row like any other end of a job (``job_history``).

        Looks at the first ``:scan`` due waiting jobs in claim order (of ``:queues`` when
        ``by_queue``): the ones a claim takes first. Run after a failed claim, never on the
        hot path.
        """
        found = self._built.get(("fail_unclaimable", by_queue))
        if found is not None:
            return cast(sa.Select[Any], found)
        j = self.jobs
        limit, most = INDEXED_VALUE_LIMIT, 2**31 - 1

        def too_long(column: sa.ColumnElement[Any]) -> tuple[Any, Any]:
            size = sa.func.pg_column_size(column)
            text = f"{column.name} is %s bytes (%s as stored), over the limit of {limit} bytes"
            why = sa.func.format(_text_literal(text), sa.func.octet_length(column), size)
            return size > limit, why

        def undecodable(column: sa.ColumnElement[Any]) -> tuple[Any, Any]:
            deep = f"strict $.**{{{MAX_JSON_DEPTH} to last}}"
            huge = 'strict $.** ? (@.type() == "number" && @.abs() >= 1e4300)'
            when = sa.or_(
                sa.func.jsonb_path_exists(column, _text_literal(deep)),
                sa.func.jsonb_path_exists(column, _text_literal(huge)),
            )
            text = (
                f"{column.name} cannot be read by Python's JSON decoder (nested over "
                f"{MAX_JSON_DEPTH} levels, or an integer of over 4300 digits)"
            )
            return when, _text_literal(text)

        reasons = [
            too_long(j.c.lock),
            too_long(j.c.concurrency_key),
            (j.c.attempts >= most, _text_literal(f"attempts is {most}, the largest it can be")),
            undecodable(j.c.args),
            undecodable(j.c.trace_context),
        ]
        message = sa.func.concat(
            _text_literal("this job cannot be claimed: "),
            sa.case(*reasons),
            _text_literal(" (a value defer refuses: the row was written by other means)"),
        )
        error = sa.func.jsonb_build_object(
            _text_literal("type"),
            _text_literal("UnclaimableJob"),
            _text_literal("message"),
            message,
        )
        first = sa.select(j.c.id).where(j.c.status == TODO, _due(j.c.scheduled_at))
        if by_queue:
            first = first.where(j.c.queue == sa.any_(_array("queues", sa.Text())))
        scanned = (
            first.order_by(j.c.priority.desc(), j.c.id)
            .limit(sa.bindparam("scan", type_=sa.Integer))
            .scalar_subquery()
        )
        found = (
            sa.update(j)
            .where(j.c.id.in_(scanned), j.c.status == TODO)
            .where(sa.or_(*(when for when, _ in reasons)))
            .values(status=FAILED, error=error, finished_at=sa.func.clock_timestamp())
            .returning(j.c.id, j.c.status, j.c.children)
            .cte("changed")
        )
        found = self._settled_after(found, sa.select(found.c.id))  # a failed parent settles
        self._built["fail_unclaimable", by_queue] = found
        return found

    @cached_property
    def limits_lock(self) -> sa.Select[Any]:
        """The transaction-level lock every limited claim of this schema takes first."""
        return sa.select(
            sa.func.pg_advisory_xact_lock(sa.func.hashtext(f"pgtq:{self.t.schema}:limits"))
        )

    # -- the planner's statistics of the jobs table (pgtq/statistics.py) ---------------------

    @cached_property
    def jobs_statistics(self) -> sa.Select[Any]:
        """How stale the planner's view of the jobs table is: rows changed since its last
        ANALYZE, the rows that ANALYZE counted (-1: never analyzed), and the seconds since
        (NULL: never). Catalog reads only: no lock, no scan."""
        st = sa.table(
            "pg_stat_user_tables",
            sa.column("relid"),
            sa.column("n_mod_since_analyze"),
            sa.column("last_analyze"),
            sa.column("last_autoanalyze"),
            schema="pg_catalog",
        )
        pc = sa.table("pg_class", sa.column("oid"), sa.column("reltuples"), schema="pg_catalog")
        analyzed = sa.func.greatest(st.c.last_analyze, st.c.last_autoanalyze)
        ago = sa.cast(sa.func.extract("epoch", sa.func.now() - analyzed), sa.Float)
        return (
            sa.select(st.c.n_mod_since_analyze, pc.c.reltuples, ago)
            .select_from(st.join(pc, pc.c.oid == st.c.relid))
            .where(st.c.relid == sa.cast(sa.literal(f'"{self.t.schema}".jobs'), REGCLASS))
        )

    @cached_property
    def analyze_lock(self) -> sa.Select[Any]:
        """One ANALYZE of the jobs table at a time across the fleet: the others skip it."""
        key = sa.func.hashtext(f"pgtq:{self.t.schema}:analyze")
        return sa.select(sa.func.pg_try_advisory_xact_lock(key))

    @cached_property
    def analyze_wait(self) -> sa.TextClause:
        """ANALYZE waits this long for the table's lock, then gives up: shorter than
        ``deadlock_timeout`` (1 s), after which a waiter would cancel an autovacuum of the
        table (autovacuum yields to conflicting locks), so pgtq never stops one."""
        return sa.text("SET LOCAL lock_timeout = '200ms'")

    @cached_property
    def analyze_jobs(self) -> sa.TextClause:
        return sa.text(f'ANALYZE "{self.t.schema}".jobs')

    @cached_property
    def running_counts(self) -> sa.Select[Any]:
        """Jobs ``doing`` per limited task and queue (keys ``task:x`` / ``queue:y``)."""
        j = self.jobs
        by_task = (
            sa.select((sa.literal("task:") + j.c.task_name).label("key"), sa.func.count())
            .where(j.c.status == DOING, j.c.task_name == sa.any_(_array("tasks", sa.Text())))
            .group_by(j.c.task_name)
        )
        by_queue = (
            sa.select((sa.literal("queue:") + j.c.queue).label("key"), sa.func.count())
            .where(j.c.status == DOING, j.c.queue == sa.any_(_array("queue_names", sa.Text())))
            .group_by(j.c.queue)
        )
        return sa.union_all(by_task, by_queue).subquery().select()

    @cached_property
    def read_buckets(self) -> sa.Select[Any]:
        b = self.t.limit_buckets
        # The wall clock, not the transaction's start: a claim may have waited for the lock.
        elapsed = sa.func.extract("epoch", sa.func.clock_timestamp() - b.c.updated_at)
        return sa.select(b.c.key, b.c.tokens, elapsed).where(
            b.c.key == sa.any_(_array("keys", sa.Text()))
        )

    @cached_property
    def read_key_buckets(self) -> sa.Select[Any]:
        """The key buckets (``key:<task>#...``) of the tasks ``:key_patterns`` name (LIKE
        patterns): tokens and seconds since written, as :attr:`read_buckets`."""
        b = self.t.limit_buckets
        elapsed = sa.func.extract("epoch", sa.func.clock_timestamp() - b.c.updated_at)
        return sa.select(b.c.key, b.c.tokens, elapsed).where(
            b.c.key.like(sa.any_(_array("key_patterns", sa.Text())))
        )

    @cached_property
    def delete_buckets(self) -> Any:
        """Drop the buckets ``:full_keys``: refilled to the full, the same as no bucket."""
        b = self.t.limit_buckets
        return sa.delete(b).where(b.c.key == sa.any_(_array("full_keys", sa.Text())))

    @cached_property
    def write_buckets(self) -> Any:
        b = self.t.limit_buckets
        rows = (
            sa.func.unnest(_array("keys", sa.Text()), _array("bucket_tokens", sa.Float()))
            .table_valued(sa.column("key", sa.Text), sa.column("tokens", sa.Float))
            .render_derived("charged")
        )
        stmt = pg_insert(b).from_select(
            ["key", "tokens", "updated_at"],
            sa.select(rows.c.key, rows.c.tokens, sa.func.clock_timestamp()),
        )
        return stmt.on_conflict_do_update(
            index_elements=[b.c.key],
            set_={"tokens": stmt.excluded.tokens, "updated_at": sa.func.clock_timestamp()},
        )

    @cached_property
    def clear_old_results(self) -> Any:
        """Drop the results of jobs that ended over ``:older_than`` seconds ago (the job rows
        and their history stay): the results' retention period."""
        j = self.jobs
        ended_before = sa.func.now() - sa.bindparam("older_than", type_=sa.Float) * ONE_SECOND
        return (
            sa.update(j)
            .where(j.c.finished_at.is_not(None), j.c.finished_at < ended_before)
            .where(j.c.result.is_not(None))
            .values(result=sa.null())
            .returning(j.c.id)
        )

    @cached_property
    def set_queue_limits(self) -> Any:
        q = self.t.queues
        stmt = pg_insert(q).values(
            name=sa.bindparam("queue_name", type_=sa.Text),
            concurrency=sa.bindparam("queue_concurrency", type_=sa.Integer),
            rate_limit=sa.bindparam("queue_rate_limit", type_=sa.Float),
        )
        return stmt.on_conflict_do_update(
            index_elements=[q.c.name],
            set_={"concurrency": stmt.excluded.concurrency, "rate_limit": stmt.excluded.rate_limit},
        )

    @cached_property
    def queue_limits(self) -> sa.Select[Any]:
        q = self.t.queues
        return sa.select(q.c.name, q.c.concurrency, q.c.rate_limit).where(
            sa.or_(q.c.concurrency.is_not(None), q.c.rate_limit.is_not(None))
        )

    @cached_property
    def release(self) -> Any:
        """Give back claimed jobs that never started: ``doing → todo``, attempt undone; one
        whose abort was requested meanwhile ends ``aborted`` instead (never runs again)."""
        return self._release(self.jobs.c.id == sa.any_(_array("ids", sa.BigInteger())))

    @cached_property
    def release_unknown(self) -> Any:
        """Give back this worker's ``doing`` jobs it does not know of (``:known`` are the ones
        it runs, holds or is writing): what a claim whose reply was lost left behind."""
        return self._release(self.jobs.c.id != sa.all_(_array("known", sa.BigInteger())))

    def _release(self, which: sa.ColumnElement[bool]) -> Any:
        j = self.jobs
        aborting = j.c.abort_requested
        changed = (
            sa.update(j)
            .where(which, *self._held_by_worker())
            .values(
                status=sa.case((aborting, ABORTED), else_=TODO),
                attempts=j.c.attempts - 1,
                worker_id=sa.case((aborting, j.c.worker_id), else_=sa.null()),
                started_at=sa.case((aborting, j.c.started_at), else_=sa.null()),
                finished_at=sa.case((aborting, sa.func.now()), else_=sa.null()),
                abort_requested=sa.false(),
            )
            .returning(j.c.id, j.c.status, j.c.children)
            .cte("changed")
        )
        # A parent aborted before it started settles its children (not the hot path: a
        # worker releases jobs when it stops or loses its lease).
        return self._settled_after(changed, sa.select(changed.c.id))

    # -- complete --------------------------------------------------------------------------

    @cached_property
    def complete(self) -> sa.Select[Any]:
        """Write a batch of outcomes in one statement.

        ``doing → succeeded | failed | aborted``, or ``doing → todo`` for a retry (``retry_in``
        seconds from now). Guarded by ``status = 'doing' AND worker_id = :me``: a job
        that was rescued or re-queued meanwhile is never overwritten. The jobs that ended are
        announced on the done channel (:meth:`_announce_done`).
        """
        return cast(sa.Select[Any], self._completion(False, _NOTHING_RARE, quiet=False))

    @cached_property
    def complete_deleting(self) -> sa.Select[Any]:
        """``complete``, except that jobs ending in one of ``:delete_statuses`` are deleted
        (a worker's ``delete_jobs`` option), with the same guard."""
        return cast(sa.Select[Any], self._completion(True, _NOTHING_RARE, quiet=False))

    def completion(self, deleting: bool, rare: Rare, quiet: bool = False) -> Any:
        """The completion statement a batch needs. Nearly every batch takes ``complete`` (or
        ``complete_deleting``); a batch with a rare outcome takes a variant, built once:
        ``rare.snoozing`` (a ``snoozed`` outcome: back to ``todo`` with its attempt given
        back and one more snooze counted, or ``failed`` past :data:`MAX_SNOOZES`),
        ``rare.moving`` (a retry into another queue or at another priority, from
        ``:queues`` and ``:priorities``), ``rare.progress`` (outcomes carrying their job's
        last ``ctx.set_progress``, ``:outcome_progress``), ``rare.running`` (the progress of
        jobs still running, written by the same statement: :meth:`_write_progress`),
        ``rare.releasing`` (jobs with children, which every other variant refuses:
        :meth:`_complete_releasing`). So those cost the other batches nothing. ``quiet``:
        without the NOTIFY of the jobs that ended (``App(notify_completions=False)``)."""
        if not rare and not quiet:
            return self.complete_deleting if deleting else self.complete
        key = (deleting, rare, quiet)
        found = self._completions.get(key)
        if found is None:
            found = self._completions[key] = self._completion(deleting, rare, quiet)
        return found

    def _completion(self, deleting: bool, rare: Rare, quiet: bool) -> Any:
        u = self._outcomes(rare)
        found: Any
        if rare.releasing:
            found = self._complete_releasing(u, deleting, rare, quiet)
        elif deleting:
            found = self._complete_deleting(rare, quiet)
        elif quiet:
            found = self._complete_update(u, rare=rare)
        else:
            updated = self._complete_update(u, rare=rare, with_status=True).cte("completed")
            done = self._announce_done(updated, updated.c.status != TODO)
            found = sa.select(updated.c.id).select_from(updated.outerjoin(done, sa.true()))
        if rare.running:  # other rows than the outcomes' (the completer sees to it)
            found = found.add_cte(self._write_progress().cte("progressed"))
        return found

    def _announce_done(
        self, ended: sa.CTE, final: sa.ColumnElement[bool], name: str = "done"
    ) -> sa.CTE:
        """One NOTIFY on the done channel for the rows of ``ended`` that are ``final``, none
        when there is none: the ids, comma-separated (``12,13,20``), or :data:`DONE_MANY` when
        they would not fit PostgreSQL's 8000-byte payload (every waiter then re-reads). A CTE
        the caller must join (PostgreSQL skips a plain SELECT CTE nobody reads).

        Only while somebody listens (a live row in ``watchers``, one test a statement): a
        NOTIFY costs the commit the server's notification queue, which jobs nobody waits for
        paid at every completion. A waiter that came up after this statement's snapshot
        re-checks its jobs once it listens (pgtq/watcher.py)."""
        ids = sa.func.string_agg(sa.cast(ended.c.id, sa.Text), sa.literal_column("','"))
        payload = sa.case(
            (sa.func.length(ids) > sa.literal_column(str(DONE_PAYLOAD_MAX)), _DONE_MANY),
            else_=ids,
        )
        return (
            sa.select(sa.func.pg_notify(self._done_channel, payload).label("sent"))
            .select_from(ended)
            .where(final, self._someone_listens)
            .having(sa.func.count() > sa.literal_column("0"))
            .cte(name)
        )

    @property
    def _someone_listens(self) -> sa.ColumnElement[bool]:
        w = self.t.watchers
        return sa.exists().where(w.c.expires_at > sa.func.now())

    @cached_property
    def watcher_up(self) -> sa.Insert:
        """Say this watcher (``:watcher_id``) listens, for ``:watcher_ttl`` seconds from now
        (written again before then while it does)."""
        w = self.t.watchers
        until = sa.func.now() + sa.bindparam("watcher_ttl", type_=sa.Float) * ONE_SECOND
        insert = pg_insert(w).values(id=sa.bindparam("watcher_id", type_=sa.Text), expires_at=until)
        return insert.on_conflict_do_update(
            index_elements=[w.c.id], set_={"expires_at": insert.excluded.expires_at}
        )

    @cached_property
    def watcher_down(self) -> sa.Delete:
        """This watcher no longer listens; rows of watchers that expired (their process
        died) go too."""
        w = self.t.watchers
        return sa.delete(w).where(
            sa.or_(
                w.c.id == sa.bindparam("watcher_id", type_=sa.Text),
                w.c.expires_at < sa.func.now(),
            )
        )

    @property
    def _done_channel(self) -> sa.ColumnElement[str]:
        return sa.literal_column(f"'{self.done_channel}'", sa.Text)

    @cached_property
    def ended_among(self) -> sa.Select[Any]:
        """Which of ``:watched`` are not waiting nor running (ended, or no such job): the
        watcher's safety net, one statement for every waiter of an app, for the jobs that
        ended with no NOTIFY (:mod:`pgtq.watcher`)."""
        j = self.jobs
        w = (
            sa.func.unnest(_array("watched", sa.BigInteger()))
            .table_valued(sa.column("id", sa.BigInteger()))
            .render_derived("watched")
        )
        live = sa.exists().where(j.c.id == w.c.id, j.c.status.in_([TODO, DOING, BLOCKED]))
        return sa.select(w.c.id).where(~live)

    @cached_property
    def set_progress(self) -> ReturningUpdate[Any]:
        """Write the latest progress of running jobs, when no outcome goes with it."""
        return self._write_progress()

    def _write_progress(self) -> ReturningUpdate[Any]:
        """``progress`` of each job in ``:progress_ids`` set from ``:progress_values`` (JSON
        text), only while the attempt ``:progress_attempts`` holds it under this worker: a job
        rescued, aborted or finished meanwhile is never touched (nor brought back)."""
        j = self.jobs
        columns: tuple[tuple[str, str, sa.types.TypeEngine[Any]], ...] = (
            ("progress_ids", "id", sa.BigInteger()),
            ("progress_attempts", "attempt", sa.Integer()),
            ("progress_values", "progress", sa.Text()),
        )
        p = (
            sa.func.unnest(*(_array(param, kind) for param, _, kind in columns))
            .table_valued(*(sa.column(name, kind) for _, name, kind in columns))
            .render_derived("reported")
        )
        return (
            sa.update(j)
            .where(j.c.id == p.c.id, *self._held_by_worker(), j.c.attempts == p.c.attempt)
            .values(progress=sa.cast(p.c.progress, JSONB))
            .returning(j.c.id)
        )

    def _complete_releasing(
        self, u: Any, deleting: bool, rare: Rare, quiet: bool = False
    ) -> sa.Select[Any]:
        """The completion of a batch holding jobs with children: a parent that ends
        (succeeded, failed, aborted) settles its children in the same statement
        (:meth:`_settling`). Parents are never deleted (``delete_jobs``): their children read
        their results; the others of the batch are, as in ``complete_deleting``."""
        j = self.jobs
        parts: list[sa.Select[Any]] = []
        where: list[sa.ColumnElement[bool]] = []
        deleted: sa.CTE | None = None
        if deleting:
            deleting_row = sa.and_(
                u.c.status == sa.any_(_array("delete_statuses", sa.Text())),
                j.c.children.is_(None),
            )
            deleted = self._deleted(u, deleting_row)
            parts.append(sa.select(deleted.c.id, deleted.c.status))
            where.append(~deleting_row)
        updated = self._complete_update(u, *where, rare=rare).cte("updated")
        parts.insert(0, sa.select(updated.c.id, updated.c.status))
        finished = (
            sa.select(updated.c.id, updated.c.status, updated.c.children)
            .where(updated.c.children.is_not(None), updated.c.status.in_(ENDED))
            .cte("finished")
        )
        written = (parts[0] if len(parts) == 1 else sa.union_all(*parts)).cte("written")
        joined: Any = written
        for cte in self._settling(finished, quiet):
            joined = joined.outerjoin(cte, sa.true())
        if not quiet:  # the jobs that ended, on the done channel (as ``complete`` does)
            ended = self._announce_done(written, written.c.status != TODO)
            joined = joined.outerjoin(ended, sa.true())
        found = sa.select(written.c.id).select_from(joined)
        if deleted is not None:
            found = found.add_cte(self._history_of_deleted(deleted))
        return found

    def _settling(self, finished: sa.CTE, quiet: bool = False, gone: bool = False) -> list[sa.CTE]:
        """Settle the children of the jobs in ``finished`` (``id``, ``status``, ``children``:
        jobs with children that just ended), in the statement that ended them. Returns the
        CTEs the statement must join, each of one row at most (a SELECT CTE that no part
        reads is not run): the released children's NOTIFY, the guard, and (unless
        ``quiet``) the done channel's NOTIFY of the children it cancelled.

        Per edge of a finished parent: success, or a failure on a ``run`` edge, settles it
        (the child's ``pending_parents`` goes down by one; at 0 the child is released,
        ``blocked → todo``, and announced); a failure on a ``cancel`` edge cancels the child
        (``blocked → cancelled``, error ``ParentFailed``) and, through their own ``cancel``
        edges, its blocked descendants (their ``run`` edges settle); ``hold`` leaves the
        child blocked (the parent's retry resumes it). Bounded work: the edges of the
        parents finished, an index read each, and one update per child touched, its row
        locked in id order (two completions touching the same children never deadlock).
        The decrement is exact under concurrency: a child whose row another completion
        changed meanwhile is updated from its newest version (PostgreSQL re-reads a row it
        waited for), so exactly one statement sees its count reach 0.

        The guard: a child inserted after this statement's snapshot, while its parent was
        running, bumped the parent's ``children`` but its edge is invisible here; then
        ``workflow_retry`` fails the statement (SQLSTATE 40001) and the worker writes it
        again, in a snapshot that sees the edge.

        A child its parent's failure cancelled keeps counting (``pending_parents``,
        ``failed_parents``) as its other parents end, so that the failed parent's retry can
        restore it (:meth:`_retry`); its status stays ``cancelled``.

        ``gone``: the parents in ``finished`` are being deleted (:meth:`_delete`), never to
        be retried: their ``hold`` edges cancel too, and a parent that ended already settles
        only those (its other edges settled when it ended)."""
        j, e = self.jobs, self.t.job_dependencies
        ok = finished.c.status == SUCCEEDED
        cancelling = [_CANCEL_EDGE, _HOLD_EDGE] if gone else [_CANCEL_EDGE]
        edges = e.join(finished, e.c.parent_id == finished.c.id)
        hit = (
            sa.select(
                e.c.parent_id,
                e.c.child_id,
                sa.or_(ok, e.c.on_parent_failure.in_([_RUN_EDGE, _FAILURE_EDGE])).label("settles"),
                sa.and_(~ok, e.c.on_parent_failure.in_(cancelling)).label("cancels"),
                (~ok).label("failed"),
                (e.c.on_parent_failure == _FAILURE_EDGE).label("on_failure"),
            )
            .select_from(edges)
            .where(
                *(
                    [
                        sa.or_(
                            ~finished.c.ended,
                            sa.and_(~ok, e.c.on_parent_failure == _HOLD_EDGE),
                        )
                    ]
                    if gone
                    else []
                )
            )
            .cte("hit")
        )

        # Below a child cancelled now (blocked until this statement: one a failure cancelled
        # before is not gone through twice): its own edges, followed down while they cancel
        # (``hold`` edges stop there; ``run`` edges settle). One row an edge, so a child
        # reached by two edges counts two; each step an index read of the parent's edges.
        # Whether a job is blocked: a subquery a row, read by primary key whatever the
        # planner thinks of the tables (a join let it scan the jobs for the blocked ones).
        def is_blocked(job_id: sa.ColumnElement[int]) -> sa.ColumnElement[bool]:
            status = j.alias("blocked_job")
            found = sa.select(status.c.status == BLOCKED).where(status.c.id == job_id)
            return sa.func.coalesce(found.scalar_subquery(), sa.false())

        seed = e.alias("seed")
        reach = (
            sa.select(
                seed.c.parent_id,
                seed.c.child_id,
                (seed.c.on_parent_failure == _CANCEL_EDGE).label("cancels"),
                (seed.c.on_parent_failure == _FAILURE_EDGE).label("on_failure"),
                is_blocked(seed.c.child_id).label("child_blocked"),
            )
            .select_from(hit.join(seed, seed.c.parent_id == hit.c.child_id))
            .where(
                hit.c.cancels, is_blocked(hit.c.child_id), seed.c.on_parent_failure != _HOLD_EDGE
            )
            .cte("reach", recursive=True)
        )
        # Each edge found carries whether its child is blocked, for the next step.
        below = e.alias("below")
        reach = reach.union(
            sa.select(
                below.c.parent_id,
                below.c.child_id,
                (below.c.on_parent_failure == _CANCEL_EDGE).label("cancels"),
                (below.c.on_parent_failure == _FAILURE_EDGE).label("on_failure"),
                is_blocked(below.c.child_id).label("child_blocked"),
            )
            .select_from(below.join(reach, below.c.parent_id == reach.c.child_id))
            .where(reach.c.cancels, reach.c.child_blocked, below.c.on_parent_failure != _HOLD_EDGE)
        )
        # Below a cancelled child, every parent reached ended badly (``failed`` true).
        hits = sa.union_all(
            sa.select(hit.c.child_id, hit.c.settles, hit.c.cancels, hit.c.failed, hit.c.on_failure),
            sa.select(
                reach.c.child_id, ~reach.c.cancels, reach.c.cancels, sa.true(), reach.c.on_failure
            ),
        ).subquery("hits")
        per_child = (
            sa.select(
                hits.c.child_id,
                sa.func.count().filter(hits.c.settles).label("n"),
                sa.func.bool_or(hits.c.cancels).label("cancel"),
                sa.func.count().filter(sa.and_(hits.c.settles, hits.c.failed)).label("failures"),
                sa.func.bool_or(hits.c.on_failure).label("on_failure"),
            )
            .group_by(hits.c.child_id)
            .cte("per_child")
        )
        # ``id = ANY(array)``: the children by primary key, whatever the planner thinks of
        # the number of blocked jobs (a join let it scan the table for them).
        children = sa.select(sa.func.array_agg(per_child.c.child_id)).scalar_subquery()
        # ``was``: the status as locked (PostgreSQL returns the newest version of a row it
        # waited for), so a child is cancelled and announced once.
        locked = (
            sa.select(j.c.id, j.c.status.label("was"))
            .where(
                j.c.id == sa.any_(sa.cast(children, ARRAY(sa.BigInteger()))),
                self._waiting_for_parents(j),
            )
            .order_by(j.c.id)
            .with_for_update(of=j)
            .cte("locked")
        )
        pending = j.c.pending_parents - per_child.c.n
        blocked = j.c.status == BLOCKED
        cancel = sa.and_(blocked, per_child.c.cancel)
        failures = per_child.c.failures
        # A batch's on_failure callback: released only if some parent did not succeed.
        none_failed = sa.and_(
            per_child.c.on_failure,
            sa.func.coalesce(j.c.failed_parents, 0) + failures == 0,
        )
        released = sa.case((none_failed, CANCELLED), else_=TODO)
        ends = sa.and_(blocked, pending <= 0)
        settled = (
            sa.update(j)
            .where(
                j.c.id == per_child.c.child_id,
                j.c.id == locked.c.id,
                self._waiting_for_parents(j),
            )
            .values(
                pending_parents=pending,
                failed_parents=sa.case(
                    (failures > 0, sa.func.coalesce(j.c.failed_parents, 0) + failures),
                    else_=j.c.failed_parents,
                ),
                status=sa.case((cancel, CANCELLED), (ends, released), else_=j.c.status),
                finished_at=sa.case(
                    (sa.or_(cancel, sa.and_(ends, none_failed)), sa.func.now()),
                    else_=j.c.finished_at,
                ),
                error=sa.case((cancel, _PARENT_FAILED), else_=j.c.error),
            )
            .returning(j.c.id, j.c.status, j.c.queue, locked.c.was)
            .cte("settled")
        )
        # Edges the parents count, less the edges found: two sums, no join of the two (a
        # join was planned as a nested loop, O(n²) in a batch of thousands of parents).
        counted = sa.select(sa.func.coalesce(sa.func.sum(finished.c.children), 0))
        found = sa.select(sa.func.count()).select_from(hit)
        missed = counted.scalar_subquery() - found.scalar_subquery()
        retry = getattr(sa.func, self.t.schema).workflow_retry
        guard = (
            sa.select(retry(sa.cast(missed, sa.BigInteger)).label("missed"))
            .cte("guard")
            .prefix_with("MATERIALIZED")
        )
        payload = (
            _text_literal("#")
            + sa.cast(sa.func.min(settled.c.id), sa.Text)
            + _text_literal(":")
            + sa.cast(sa.func.count(), sa.Text)
            + _text_literal(" ")
            + settled.c.queue
        )
        notified = (
            sa.select(sa.func.pg_notify(self._channel, payload).label("sent"))
            .where(settled.c.status == TODO, settled.c.was == BLOCKED)
            .group_by(settled.c.queue)
            .cte("released_notified")
        )
        announced = (
            sa.select(sa.func.count().label("sent"))
            .select_from(notified)
            .cte("released_announced")
            .prefix_with("MATERIALIZED")
        )
        # A deleted parent's hits leave out the edges it settled when it ended: no guard.
        joins = [announced] if gone else [announced, guard]
        if not quiet:  # children cancelled here ended: announced like any job that ends
            ended = sa.and_(settled.c.status == CANCELLED, settled.c.was == BLOCKED)
            joins.append(self._announce_done(settled, ended, name="children_done"))
        return joins

    @staticmethod
    def _waiting_for_parents(j: sa.Table | sa.Alias) -> sa.ColumnElement[bool]:
        """A child whose parents' ends still count: ``blocked``, or cancelled by a parent's
        failure (that parent's retry restores it: :meth:`_retry`)."""
        return _opaque(
            sa.or_(
                j.c.status == BLOCKED,
                sa.and_(
                    j.c.status == CANCELLED,
                    j.c.error.op("->>")(_text_literal("type")) == _PARENT_FAILED_TYPE,
                ),
            )
        )

    def _deleted(self, u: Any, deleting: sa.ColumnElement[bool]) -> sa.CTE:
        """The outcomes' rows that end deleted (a worker's ``delete_jobs``), deleted."""
        j = self.jobs
        return (
            sa.delete(j)
            .where(j.c.id == u.c.id, deleting, *self._held_by_worker(), self._same_attempt(u))
            .returning(
                j.c.id,
                j.c.created_at,
                j.c.started_at,
                j.c.attempts,
                j.c.worker_id,
                u.c.status,
                u.c.error,
            )
            .cte("deleted")
        )

    def _complete_deleting(self, rare: Rare, quiet: bool = False) -> sa.Select[Any]:
        u = self._outcomes(rare)
        deleting = u.c.status == sa.any_(_array("delete_statuses", sa.Text()))
        # A job with children is never deleted here, nor written (``_complete_update``).
        deleted = self._deleted(u, sa.and_(deleting, self.jobs.c.children.is_(None)))
        updated = self._complete_update(u, ~deleting, rare=rare, with_status=not quiet)
        updated_rows = updated.cte("updated")
        history = self._history_of_deleted(deleted)
        if quiet:
            found = sa.union_all(sa.select(deleted.c.id), sa.select(updated_rows.c.id)).subquery()
            return found.select().add_cte(history)
        # Every deleted job ended (a retry is never deleted); an updated one unless ``todo``.
        ended = sa.union_all(
            sa.select(deleted.c.id, deleted.c.status),
            sa.select(updated_rows.c.id, updated_rows.c.status),
        ).cte("ended")
        done = self._announce_done(ended, ended.c.status != TODO)
        return sa.select(ended.c.id).select_from(ended.outerjoin(done, sa.true())).add_cte(history)

    def _history_of_deleted(self, deleted: sa.CTE) -> sa.CTE:
        """The history a deleted job's row can no longer tell, stored while history is on:
        ``deferred``, ``started`` and its end (the ``job_history`` view then shows these)."""
        e, d = self.t.job_events, deleted.c
        now = sa.func.clock_timestamp()
        failed = d.status.in_([FAILED, ABORTED])
        events = sa.union_all(
            sa.select(
                d.id.label("job_id"),
                sa.literal("deferred").label("type"),
                d.created_at.label("at"),
                sa.literal(0).label("attempt"),
                sa.cast(sa.null(), sa.Text).label("worker_id"),
                sa.cast(sa.null(), JSONB).label("error"),
            ),
            sa.select(
                d.id,
                sa.literal("started"),
                sa.func.coalesce(d.started_at, now),
                d.attempts,
                d.worker_id,
                sa.cast(sa.null(), JSONB),
            ),
            sa.select(
                d.id,
                d.status,
                now,
                d.attempts,
                d.worker_id,
                sa.case((failed, sa.cast(d.error, JSONB)), else_=sa.cast(sa.null(), JSONB)),
            ),
        ).subquery()
        columns = ["job_id", "type", "at", "attempt", "worker_id", "error"]
        rows = sa.select(*events.c).where(self._history_on)
        return e.insert().from_select(columns, rows).cte("stored")

    def _outcomes(self, rare: Rare | None = None) -> Any:
        columns: tuple[tuple[str, str, sa.types.TypeEngine[Any]], ...] = (
            ("ids", "id", sa.BigInteger()),
            ("outcome_attempts", "attempt", sa.Integer()),
            ("statuses", "status", sa.Text()),
            ("results", "result", sa.Text()),
            ("errors", "error", sa.Text()),
            ("retry_in", "retry_in", sa.Float()),
        )
        if rare is not None and rare.moving:
            columns += (("queues", "queue", sa.Text()), ("priorities", "priority", sa.Integer()))
        if rare is not None and rare.progress:
            columns += (("outcome_progress", "progress", sa.Text()),)
        return (
            sa.func.unnest(*(_array(param, kind) for param, _, kind in columns))
            .table_valued(*(sa.column(name, kind) for _, name, kind in columns))
            .render_derived("outcomes")
        )

    def _same_attempt(self, u: Any) -> sa.ColumnElement[bool]:
        """The outcome is of the attempt now running: a worker that was declared dead and
        came back cannot write an old attempt's outcome over a newer one."""
        return sa.or_(u.c.attempt.is_(None), self.jobs.c.attempts == u.c.attempt)

    def _held_by_worker(self) -> tuple[sa.ColumnElement[bool], ...]:
        j = self.jobs
        return (j.c.status == DOING, j.c.worker_id == sa.bindparam("me", type_=sa.Text))

    def _complete_update(
        self,
        u: Any,
        *where: sa.ColumnElement[bool],
        rare: Rare | None = None,
        with_status: bool = False,
    ) -> ReturningUpdate[Any]:
        j = self.jobs
        snoozing = rare is not None and rare.snoozing
        back = u.c.status.in_([TODO, SNOOZED_OUTCOME]) if snoozing else u.c.status == TODO
        # A retry of a job whose abort was requested ends it ``aborted``: never run again.
        aborted_retry = sa.and_(back, j.c.abort_requested)
        status: sa.ColumnElement[Any] = sa.case((aborted_retry, ABORTED), else_=u.c.status)
        error: sa.ColumnElement[Any] = sa.cast(u.c.error, JSONB)
        snoozed: dict[str, Any] = {}  # the columns only a rare outcome writes
        retrying = sa.and_(back, ~j.c.abort_requested)
        if snoozing:
            over = sa.and_(u.c.status == SNOOZED_OUTCOME, j.c.snoozes >= _MAX_SNOOZES)
            retrying = sa.and_(retrying, ~over)
            given_back = sa.case((sa.and_(u.c.status == SNOOZED_OUTCOME, retrying), 1), else_=0)
            status = sa.case(
                (aborted_retry, ABORTED), (over, FAILED), (back, TODO), else_=u.c.status
            )
            error = sa.case((over, _SNOOZED_TOO_OFTEN), else_=error)
            snoozed = {
                "attempts": j.c.attempts - given_back,
                "snoozes": j.c.snoozes + given_back,
            }
        if rare is not None and rare.moving:
            snoozed["queue"] = sa.case(
                (retrying, sa.func.coalesce(u.c.queue, j.c.queue)), else_=j.c.queue
            )
            snoozed["priority"] = sa.case(
                (retrying, sa.func.coalesce(u.c.priority, j.c.priority)), else_=j.c.priority
            )
        if rare is not None and rare.progress:  # a job's last progress, or the one it had
            snoozed["progress"] = sa.func.coalesce(sa.cast(u.c.progress, JSONB), j.c.progress)
        releasing = rare is not None and rare.releasing
        # A job with children is written by the releasing variant only, which settles them:
        # every other variant refuses it (one NULL test a row), and the caller writes it
        # again with that one (``refused_outcomes``).
        returning = (
            (j.c.id, j.c.status, j.c.children)
            if releasing
            else (j.c.id, *([j.c.status] if with_status else []))
        )
        childless = () if releasing else (j.c.children.is_(None),)
        return (
            sa.update(j)
            .where(
                j.c.id == u.c.id,
                *self._held_by_worker(),
                self._same_attempt(u),
                *where,
                *childless,
            )
            .values(
                status=status,
                result=sa.cast(u.c.result, JSONB),
                error=error,
                abort_requested=sa.false(),
                worker_id=sa.case((retrying, sa.null()), else_=j.c.worker_id),
                scheduled_at=sa.case(
                    (retrying, sa.func.now() + u.c.retry_in * ONE_SECOND),
                    else_=j.c.scheduled_at,
                ),
                finished_at=sa.case((retrying, sa.null()), else_=sa.func.clock_timestamp()),
                **snoozed,
            )
            .returning(*returning)
        )

    # -- control ---------------------------------------------------------------------------

    def _notify_each(
        self,
        changed: sa.CTE,
        channel: str,
        payload: sa.ColumnElement[Any],
        when: sa.ColumnElement[bool],
        ended: sa.ColumnElement[bool] | None = None,
    ) -> sa.Select[Any]:
        """Select the changed rows, sending one NOTIFY per row that matches ``when``, and
        announcing those that ``ended`` on the done channel (one NOTIFY)."""
        sent = (
            sa.select(sa.func.count(sa.func.pg_notify(channel, payload)).label("sent"))
            .select_from(changed)
            .where(when)
            .cte("sent")
        )
        joined = changed.join(sent, sa.true())
        if ended is not None:
            joined = joined.outerjoin(self._announce_done(changed, ended), sa.true())
        return sa.select(changed.c.id, changed.c.status, changed.c.queue).select_from(joined)

    def _acting_on(self, action: Action) -> sa.ColumnElement[bool]:
        """The jobs ``action`` may change (:data:`ACTS_ON`), statuses as literals. With
        ``blocked`` among them, one equality each, ORed: the planner then reads each status
        from its partial index (``jobs_blocked_idx`` and the claim index, ...); it cannot
        split an ``IN`` list across partial indexes."""
        statuses = ACTS_ON[action]
        if Status.BLOCKED in statuses:
            return sa.or_(*(self.jobs.c.status == _status(s) for s in statuses))
        return self.jobs.c.status.in_([_status(s) for s in statuses])

    def _one_job(self) -> sa.ColumnElement[bool]:
        """The WHERE of a control by id: ``:job_id``."""
        return self.jobs.c.id == sa.bindparam("job_id", type_=sa.BigInteger)

    @cached_property
    def abort(self) -> sa.Select[Any]:
        return self._abort(self._one_job())

    def _abort(self, *where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        """``todo | blocked → cancelled`` at once (a cancelled parent settles its children:
        :meth:`_settling`); a ``doing`` job gets ``abort_requested`` and a NOTIFY."""
        j = self.jobs
        was_todo = j.c.status.in_([TODO, BLOCKED])
        changed = (
            sa.update(j)
            .where(*where, self._acting_on("abort"))
            .values(
                status=sa.case((was_todo, CANCELLED), else_=j.c.status),
                abort_requested=sa.case((was_todo, j.c.abort_requested), else_=sa.true()),
                finished_at=sa.case((was_todo, sa.func.now()), else_=j.c.finished_at),
            )
            .returning(j.c.id, j.c.status, j.c.queue, j.c.worker_id, j.c.children)
            .cte("changed")
        )
        notified = self._notify_each(
            changed,
            self.abort_channel,
            sa.cast(changed.c.id, sa.Text),
            changed.c.status == DOING,
            ended=changed.c.status == CANCELLED,
        )
        return self._settled_after(changed, notified)

    def _settled_after(self, changed: sa.CTE, select: sa.Select[Any]) -> sa.Select[Any]:
        """``select`` (over ``changed``: ``id``, ``status``, ``children``) with the children
        of the jobs it ended settled in the same statement (:meth:`_settling`)."""
        finished = (
            sa.select(changed.c.id, changed.c.status, changed.c.children)
            .where(changed.c.children.is_not(None), changed.c.status.in_(ENDED))
            .cte("finished")
        )
        done = select.subquery("settling")
        joined: Any = done
        for cte in self._settling(finished):
            joined = joined.outerjoin(cte, sa.true())
        return sa.select(*done.c).select_from(joined)

    @cached_property
    def retry(self) -> sa.Select[Any]:
        return self._retry(self._one_job())

    def _retry(self, *where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        """``failed | aborted | cancelled → todo``, due now, with a NOTIFY to wake a worker
        (the same payload for each job of a queue: PostgreSQL sends it once a transaction)."""
        j = self.jobs
        changed = (
            sa.update(j)
            # A batch's record is no task: it never goes back to ``todo``.
            .where(*where, self._acting_on("retry"), j.c.task_name != _text_literal(BATCH_TASK))
            .values(
                status=TODO,
                scheduled_at=sa.null(),
                worker_id=sa.null(),
                abort_requested=sa.false(),
                started_at=sa.null(),
                finished_at=sa.null(),
            )
            .returning(j.c.id, j.c.status, j.c.queue, j.c.children)
            .cte("changed")
        )
        return self._notify_each(changed, self.channel, changed.c.queue, sa.true()).add_cte(
            self._resumed(changed)
        )

    def _resumed(self, changed: sa.CTE) -> sa.CTE:
        """The workflow below the retried jobs of ``changed`` (``id``, ``children``) resumed,
        in the retry's statement:

        - *restored*: the jobs their failure cancelled (``ParentFailed``, reached over
          ``cancel`` edges) go back to ``blocked``, their counts kept while they were
          cancelled (:meth:`_settling`) and right again; except a job that another parent,
          still ended badly, cancels over a ``cancel`` edge, and what it cancelled below.
        - *pending again*: a retried or restored job is pending again for its children still
          waiting on a ``run`` or ``failure`` edge (its failure had settled that edge, and
          counted as a failure for the latter). ``hold`` and ``cancel`` edges were left
          pending, so a held child simply waits for the new attempt.

        Bounded by the workflow below the retried jobs: index reads of its edges (by parent,
        and by child for the restored jobs' other parents). One UPDATE for both, so a job
        both restored and pending again is written once."""
        j, e = self.jobs, self.t.job_dependencies
        # ``= ANY(array)``: the edges by their primary key, whatever the planner thinks of
        # the table (a join let it scan a small one).
        retried = sa.cast(
            sa.select(sa.func.array_agg(changed.c.id))
            .where(changed.c.children.is_not(None))
            .scalar_subquery(),
            ARRAY(sa.BigInteger()),
        )
        every_retried = sa.cast(
            sa.select(
                sa.func.coalesce(sa.func.array_agg(changed.c.id), sa.literal_column("'{}'"))
            ).scalar_subquery(),
            ARRAY(sa.BigInteger()),
        )

        # A job's status, a subquery a row: read by primary key whatever the planner thinks
        # of the tables (a join let it scan a status index for every such job).
        def status_is(job_id: sa.ColumnElement[int], test: Any) -> sa.ColumnElement[bool]:
            job = j.alias("status_of")
            found = sa.select(test(job)).where(job.c.id == job_id)
            return sa.func.coalesce(found.scalar_subquery(), sa.false())

        def by_failure(job: Any) -> sa.ColumnElement[bool]:
            type_ = job.c.error.op("->>")(_text_literal("type"))
            return sa.and_(job.c.status == CANCELLED, type_ == _PARENT_FAILED_TYPE)

        def cancelled_below(edge: Any, parent: sa.ColumnElement[bool]) -> sa.Select[Any]:
            return sa.select(edge.c.parent_id.label("parent"), edge.c.child_id.label("id")).where(
                parent,
                edge.c.on_parent_failure == _CANCEL_EDGE,
                status_is(edge.c.child_id, by_failure),
            )

        first = e.alias("first_edge")
        reached = cancelled_below(first, first.c.parent_id == sa.any_(retried)).cte(
            "reached", recursive=True
        )
        step = e.alias("next_edge")
        reached = reached.union(cancelled_below(step, step.c.parent_id == reached.c.id))
        # Still cancelled by a parent outside the retry: it, and what it cancelled below.
        other = e.alias("other_edge")
        still_bad = (
            sa.select(reached.c.id)
            .select_from(reached.join(other, other.c.child_id == reached.c.id))
            .where(
                other.c.on_parent_failure == _CANCEL_EDGE,
                status_is(
                    other.c.parent_id, lambda job: job.c.status.in_([FAILED, CANCELLED, ABORTED])
                ),
                other.c.parent_id.not_in(sa.select(reached.c.id)),
                other.c.parent_id != sa.all_(every_retried),
            )
            .cte("kept", recursive=True)
        )
        # Down the edges ``reached`` holds (each a ``cancel`` edge): no read of the table.
        down = reached.alias("kept_edge")
        still_bad = still_bad.union(
            sa.select(down.c.id).select_from(down.join(still_bad, down.c.parent == still_bad.c.id))
        )
        restored = (
            sa.select(reached.c.id)
            .distinct()
            .where(reached.c.id.not_in(sa.select(still_bad.c.id)))
            .cte("restored")
        )
        again_from = sa.cast(
            sa.select(sa.func.array_agg(sa.column("id")))
            .select_from(
                sa.union_all(
                    sa.select(changed.c.id).where(changed.c.children.is_not(None)),
                    sa.select(restored.c.id),
                ).subquery("again_from")
            )
            .scalar_subquery(),
            ARRAY(sa.BigInteger()),
        )
        zero: sa.ColumnElement[int] = sa.literal_column("0")
        one: sa.ColumnElement[int] = sa.literal_column("1")
        deltas = sa.union_all(
            sa.select(restored.c.id, zero.label("n"), zero.label("failures"), sa.true()),
            sa.select(
                e.c.child_id,
                one,
                sa.case((e.c.on_parent_failure == _FAILURE_EDGE, one), else_=zero),
                sa.false(),
            ).where(
                e.c.parent_id == sa.any_(again_from),
                e.c.on_parent_failure.in_([_RUN_EDGE, _FAILURE_EDGE]),
            ),
        ).subquery("deltas")
        delta = (
            sa.select(
                deltas.c.id,
                sa.func.sum(deltas.c.n).label("n"),
                sa.func.sum(deltas.c.failures).label("failures"),
                sa.func.bool_or(deltas.c[3]).label("restore"),
            )
            .group_by(deltas.c.id)
            .subquery("delta")
        )
        restore = delta.c.restore
        return (
            sa.update(j)
            .where(
                j.c.id == delta.c.id,
                j.c.id != sa.all_(every_retried),
                self._waiting_for_parents(j),
            )
            .values(
                pending_parents=j.c.pending_parents + delta.c.n,
                failed_parents=sa.case(
                    (delta.c.failures > 0, j.c.failed_parents - delta.c.failures),
                    else_=j.c.failed_parents,
                ),
                status=sa.case((restore, BLOCKED), else_=j.c.status),
                finished_at=sa.case((restore, sa.null()), else_=j.c.finished_at),
                error=sa.case((restore, sa.null()), else_=j.c.error),
            )
            .returning(j.c.id)
            .cte("resumed")
        )

    @cached_property
    def reschedule(self) -> sa.Select[Any]:
        """A waiting job's new schedule and/or priority (``todo`` stays ``todo``; a job a
        worker claimed meanwhile is left alone: PostgreSQL checks the WHERE again on the row
        the claim committed). ``:new_scheduled_at`` (an instant) or ``:new_schedule_in``
        (seconds from the server's now), NULL both: the schedule stays; ``:new_priority``,
        NULL: it stays. A new schedule is announced in the insert's format
        (:func:`parse_announcement`): ``#<id>:1 <queue>`` when due now, so an idle worker
        takes it by turns, else ``@<seconds> <queue>``, so one sleeping longer wakes then."""
        j = self.jobs
        at = sa.bindparam("new_scheduled_at", type_=sa.DateTime(timezone=True))
        delay = sa.bindparam("new_schedule_in", type_=sa.Float)
        priority = sa.bindparam("new_priority", type_=sa.Integer)
        changed = (
            sa.update(j)
            .where(self._one_job(), j.c.status == TODO)
            .values(
                scheduled_at=sa.func.coalesce(
                    at, sa.func.now() + delay * ONE_SECOND, j.c.scheduled_at
                ),
                priority=sa.func.coalesce(priority, j.c.priority),
            )
            .returning(j.c.id, j.c.status, j.c.queue, j.c.scheduled_at)
            .cte("changed")
        )
        c = changed.c
        until = sa.cast(sa.func.extract("epoch", c.scheduled_at - sa.func.now()), sa.Text)
        named = sa.literal("#", sa.Text) + sa.cast(c.id, sa.Text) + sa.literal(":1", sa.Text)
        payload = (
            sa.case((_due(c.scheduled_at), named), else_=sa.literal("@", sa.Text) + until)
            + sa.literal(" ", sa.Text)
            + c.queue
        )
        moved = sa.or_(at.is_not(None), delay.is_not(None))
        return self._notify_each(changed, self.channel, payload, moved)

    @cached_property
    def fail(self) -> sa.Select[Any]:
        """``todo → failed`` at once for the job ``:fail_id``, with the error record
        ``{"type": "Failed", "message": :reason}``; no retry, whatever the task's policy.
        Selects the job's status as the statement found it and, when it failed it, its id
        (no row: no such job). A running job is left alone (that is ``abort``), and so is one
        a worker claims meanwhile.

        While history is on, the job's history is stored (``deferred`` unless stored
        already, and ``failed`` with its error), so ``job_history`` shows no attempt that
        never started (the view's events read off a row would show one)."""
        j, e = self.jobs, self.t.job_events
        job_id = sa.bindparam("fail_id", type_=sa.BigInteger)
        found = sa.select(j.c.status).where(j.c.id == job_id).cte("found")
        error = sa.func.jsonb_build_object(
            _text_literal("type"),
            _text_literal("Failed"),
            _text_literal("message"),
            sa.bindparam("reason", type_=sa.Text),
        )
        changed = (
            sa.update(j)
            .where(j.c.id == job_id, j.c.status == TODO)
            .values(status=FAILED, error=error, finished_at=sa.func.now())
            .returning(
                j.c.id,
                j.c.created_at,
                j.c.attempts,
                j.c.error,
                j.c.finished_at,
                j.c.status,
                j.c.children,
            )
            .cte("changed")
        )
        c = changed.c
        deferred_stored = sa.exists().where(e.c.job_id == c.id, e.c.type == "deferred")
        no_text, no_json = sa.cast(sa.null(), sa.Text), sa.cast(sa.null(), JSONB)
        columns = ["job_id", "type", "at", "attempt", "worker_id", "error"]
        deferred: tuple[sa.ColumnElement[Any], ...] = (
            c.id,
            _text_literal("deferred"),
            c.created_at,
            sa.literal(0),
            no_text,
            no_json,
        )
        events = sa.union_all(
            sa.select(*(v.label(n) for v, n in zip(deferred, columns, strict=True))).where(
                ~deferred_stored
            ),
            sa.select(c.id, _text_literal("failed"), c.finished_at, c.attempts, no_text, c.error),
        ).subquery()
        stored = e.insert().from_select(columns, sa.select(*events.c).where(self._history_on))
        failed = (
            sa.select(found.c.status, c.id)
            .select_from(found.outerjoin(changed, sa.true()))
            .add_cte(stored.cte("stored"))
        )
        return self._settled_after(changed, failed)  # a failed parent settles its children

    @cached_property
    def _history_on(self) -> sa.ColumnElement[bool]:
        """The history triggers are enabled (``set_history``): what a statement that stores
        events itself checks first."""
        trigger = sa.table(
            "pg_trigger",
            sa.column("tgrelid"),
            sa.column("tgname"),
            sa.column("tgenabled"),
            schema="pg_catalog",
        )
        return sa.exists().where(
            trigger.c.tgrelid == sa.cast(sa.literal(f'"{self.t.schema}".jobs'), REGCLASS),
            trigger.c.tgname == HISTORY_TRIGGERS[0],
            trigger.c.tgenabled != "D",
        )

    @cached_property
    def abort_requested(self) -> sa.Select[Any]:
        j = self.jobs
        return sa.select(j.c.id).where(
            j.c.worker_id == sa.bindparam("me", type_=sa.Text),
            j.c.status == DOING,
            j.c.abort_requested,
        )

    @cached_property
    def next_due(self) -> sa.Select[Any]:
        """Seconds from now until the earliest waiting job of ``:due_queues`` (NULL: all) that
        is not due yet, in a queue not paused; NULL when there is none. An idle worker sleeps
        until then rather than a whole polling interval. Run only when the worker goes idle
        after a timed wake-up, never on the hot path."""
        j, q = self.jobs, self.t.queues
        queues = _array("due_queues", sa.Text())
        at = sa.func.min(j.c.scheduled_at)
        return sa.select(sa.cast(sa.func.extract("epoch", at - sa.func.now()), sa.Float)).where(
            j.c.status == TODO,
            j.c.scheduled_at > sa.func.now(),
            j.c.scheduled_at < sa.literal_column("'infinity'::timestamptz"),
            sa.or_(queues.is_(None), j.c.queue == sa.any_(queues)),
            j.c.queue.not_in(sa.select(q.c.name).where(q.c.paused)),
        )

    @cached_property
    def make_due(self) -> sa.Select[Any]:
        """Waiting jobs of ``:due_queues`` (NULL: all) scheduled ahead become due now; their
        ids. For ``pgtq.testing.drain(include_scheduled=True)`` only: a test runs in a
        second what production would run in an hour."""
        j = self.jobs
        queues = _array("due_queues", sa.Text())
        made = (
            sa.update(j)
            .where(
                j.c.status == TODO,
                j.c.scheduled_at > sa.func.now(),
                sa.or_(queues.is_(None), j.c.queue == sa.any_(queues)),
            )
            .values(scheduled_at=sa.func.now())
            .returning(j.c.id)
            .cte("made")
        )
        return sa.select(made.c.id)

    # -- read ------------------------------------------------------------------------------

    @cached_property
    def no_rows(self) -> sa.Select[Any]:
        """No row: what a query about an id no job can have runs (see ``no_such_job``)."""
        return sa.select(sa.true()).where(sa.false())

    @cached_property
    def get(self) -> sa.Select[Any]:
        return sa.select(*self.job_columns).where(
            self.jobs.c.id == sa.bindparam("job_id", type_=sa.BigInteger)
        )

    @cached_property
    def job_columns(self) -> tuple[sa.ColumnElement[Any], ...]:
        """Every column of a job in ``Job``'s fields' order (``to_job`` reads them by
        position): its times clamped by ``_readable``."""
        columns = (self.jobs.c[f.name] for f in fields(Job))
        return tuple(
            _readable(c).label(c.name) if isinstance(c.type, sa.DateTime) else c for c in columns
        )

    @cached_property
    def status_counts(self) -> sa.Select[Any]:
        j = self.jobs
        return sa.select(j.c.queue, j.c.status, sa.func.count()).group_by(j.c.queue, j.c.status)

    @cached_property
    def status_counts_of(self) -> sa.Select[Any]:
        """Per status, how many of ``:ids`` have it and how many of those needed a retry."""
        j = self.jobs
        return (
            sa.select(j.c.status, sa.func.count(), sa.func.count().filter(j.c.attempts > 1))
            .where(j.c.id == sa.any_(_array("ids", sa.BigInteger())))
            .group_by(j.c.status)
        )

    @cached_property
    def migrated(self) -> sa.Select[Any]:
        return sa.select(sa.func.to_regclass(f"{self.t.schema}.jobs").is_not(None))

    # -- workers ---------------------------------------------------------------------------

    @cached_property
    def register_worker(self) -> ReturningInsert[Any]:
        w = self.t.workers
        return (
            sa.insert(w)
            .values(
                id=sa.bindparam("me", type_=sa.Text),
                hostname=sa.bindparam("worker_hostname", type_=sa.Text),
                pid=sa.bindparam("worker_pid", type_=sa.Integer),
                queues=sa.bindparam("worker_queues", type_=ARRAY(sa.Text)),
            )
            .returning(w.c.id)
        )

    @cached_property
    def heartbeat(self) -> ReturningUpdate[Any]:
        w = self.t.workers
        return (
            sa.update(w)
            .where(w.c.id == sa.bindparam("me", type_=sa.Text))
            .values(last_heartbeat=sa.func.now())
            .returning(w.c.id)
        )

    @cached_property
    def unregister_worker(self) -> ReturningDelete[Any]:
        w = self.t.workers
        return sa.delete(w).where(w.c.id == sa.bindparam("me", type_=sa.Text)).returning(w.c.id)

    # -- history --------------------------------------------------------------------------

    @cached_property
    def job_history(self) -> sa.Select[Any]:
        """Stored events merged with those read off the job's row (the ``job_history`` view)."""
        h = self.t.job_history
        return (
            sa.select(
                h.c.job_id, h.c.type, _readable(h.c.at), h.c.attempt, h.c.worker_id, h.c.error
            )
            .where(h.c.job_id == sa.bindparam("job_id", type_=sa.BigInteger))
            .order_by(h.c.at, h.c.rank, h.c.seq)
        )

    def set_history(self, enabled: bool) -> sa.TextClause:
        """Turn the history triggers on or off for every client of the database."""
        verb = "ENABLE" if enabled else "DISABLE"
        actions = ", ".join(f"{verb} TRIGGER {name}" for name in HISTORY_TRIGGERS)
        return sa.text(f'ALTER TABLE "{self.t.schema}".jobs {actions}')

    @cached_property
    def forget_dead_workers(self) -> ReturningDelete[Any]:
        """Remove workers silent for ``:after`` seconds: their running jobs become orphans.
        Never the rescuer itself (``:me``): it is alive, its own beat (a loop of its own) is
        what decides whether it was declared dead."""
        w = self.t.workers
        silent_since = sa.func.now() - sa.bindparam("after", type_=sa.Float) * ONE_SECOND
        me = sa.bindparam("me", type_=sa.Text)
        return sa.delete(w).where(w.c.last_heartbeat < silent_since, w.c.id != me).returning(w.c.id)

    @cached_property
    def roster(self) -> sa.Select[Any]:
        """The registered workers and their queues: whose turn it is (:mod:`pgtq.turns`)."""
        w = self.t.workers
        return sa.select(w.c.id, w.c.queues)

    @cached_property
    def orphaned_jobs(self) -> sa.Select[Any]:
        """Running jobs whose worker has no row: it died, or was declared dead.

        They are rescued with the guarded ``complete`` under their old worker's id, so a
        rescue racing the worker's own late write (or another rescuer) changes a job once.
        """
        j, w = self.jobs, self.t.workers
        return sa.select(
            *self._claimed_columns(sa.null()), j.c.worker_id, self._rescues(j.c.id)
        ).where(j.c.status == DOING, ~sa.exists().where(w.c.id == j.c.worker_id))

    def _rescues(self, job_id: sa.ColumnElement[int]) -> sa.Label[Any]:
        """How many times the job was rescued before (its history's ``rescued`` events)."""
        e = self.t.job_events
        return (
            sa.select(sa.func.count())
            .where(e.c.job_id == job_id, e.c.type == "rescued")
            .scalar_subquery()
            .label("rescues")
        )

    # == operations (pgtq_0002): list, stats, clean-up, cancel, queues ==========================
    # Statements keyed by their filters are built once per key: statuses stay SQL literals, so
    # the partial indexes match, and SQLAlchemy's compiled cache sees the same objects.

    @cached_property
    def _built(self) -> dict[tuple[Any, ...], Any]:
        return {}

    def _selected(self, key: SelectionKey) -> list[sa.ColumnElement[bool]]:
        """The WHERE of the filters in ``key`` (values: :meth:`Selection.params`), shared by
        the list and the bulk controls: a filter is written once, here. No parameter is named
        like a column (``only_queue``, not ``queue``): the bulk forms update ``jobs``."""
        j = self.jobs
        where: list[sa.ColumnElement[bool]] = []
        if key.ids:
            where.append(j.c.id == sa.any_(_array("only_ids", sa.BigInteger())))
        if key.queue:
            where.append(j.c.queue == sa.bindparam("only_queue", type_=sa.Text))
        if key.statuses:
            where.append(j.c.status.in_([_status(s) for s in key.statuses]))
        if key.task:
            where.append(j.c.task_name == sa.bindparam("only_task", type_=sa.Text))
        if key.lock:
            where.append(j.c.lock == sa.bindparam("only_lock", type_=sa.Text))
        if key.workflow:  # served by jobs_workflow_idx (partial: jobs of a workflow only)
            where.append(j.c.workflow_id == sa.bindparam("only_workflow", type_=sa.BigInteger))
        if key.tags:
            # ``tags @> :only_tags`` (every tag given): served by ``jobs_tags_idx`` (GIN, over
            # tagged jobs only; ``@>`` is strict, so the planner proves ``tags IS NOT NULL``).
            has_all = j.c.tags.op("@>", is_comparison=True)(_array("only_tags", sa.Text()))
            where.append(has_all)
        if key.search:
            # A substring of the arguments' JSON text (``%``, ``_`` and ``\\`` escaped by
            # ``Selection.params``): no index can serve it, so it filters the rows the other
            # filters (and a list's id order) lead to.
            pattern = sa.bindparam("search", type_=sa.Text)
            where.append(sa.cast(j.c.args, sa.Text).ilike(pattern, escape="\\"))
        # Created before / since: an instant given (``at``), or seconds before the server's
        # clock (``ago``), the clock every other age in pgtq counts on.
        for bound, name in ((key.before, "before"), (key.since, "since")):
            if bound is None:
                continue
            at: sa.ColumnElement[Any] = (
                sa.bindparam(f"{name}_at", type_=sa.DateTime(timezone=True))
                if bound == "at"
                else sa.func.now() - sa.bindparam(f"{name}_ago", type_=sa.Float) * ONE_SECOND
            )
            where.append(j.c.created_at < at if name == "before" else j.c.created_at >= at)
        return where

    def list_jobs(self, key: ListKey) -> sa.Select[Any]:
        """Jobs matching the filters in ``key``, in id order, one page (keyset on id)."""
        found = self._built.get(("list", key))
        if found is None:
            j = self.jobs
            where = self._selected(key)
            after = sa.bindparam("after", type_=sa.BigInteger)
            if key.after:
                where.append(j.c.id < after if key.newest_first else j.c.id > after)
            found = (
                sa.select(*self.job_columns)
                .where(*where)
                .order_by(j.c.id.desc() if key.newest_first else j.c.id)
                .limit(sa.bindparam("limit", type_=sa.Integer))
            )
            self._built["list", key] = found
        return found

    @cached_property
    def queue_counts(self) -> sa.CompoundSelect[Any]:
        """Per queue: waiting (with the wait of the oldest due one), running, ended badly.

        Three arms, each over a partial index (``jobs_queue_claim_idx``, ``jobs_worker_doing_idx``,
        ``jobs_unsuccessful_idx``): succeeded jobs, most of a big table, are never read.
        """
        j = self.jobs
        due = _due(j.c.scheduled_at)
        waited = sa.func.now() - sa.func.min(_due_since(j)).filter(due)
        no_age = sa.cast(sa.null(), sa.Float)
        waiting = (
            sa.select(
                j.c.queue,
                TODO.label("status"),
                sa.func.count().label("n"),
                sa.cast(sa.extract("epoch", waited), sa.Float).label("oldest"),
            )
            .where(j.c.status == TODO)
            .group_by(j.c.queue)
        )
        running = (
            sa.select(j.c.queue, DOING.label("status"), sa.func.count(), no_age)
            .where(j.c.status == DOING)
            .group_by(j.c.queue)
        )
        ended_badly = (
            sa.select(j.c.queue, j.c.status, sa.func.count(), no_age)
            .where(j.c.status.in_([FAILED, ABORTED, CANCELLED]))
            .group_by(j.c.queue, j.c.status)
        )
        return sa.union_all(waiting, running, ended_badly)

    @cached_property
    def finished_counts(self) -> sa.Select[Any]:
        """Jobs finished in the last ``:window`` seconds per (queue, task): the rates.

        A range of ``jobs_finished_at_idx``; cancelled jobs never ran and are not counted, nor
        an end at ``infinity`` (written by other means: it would count in every window).
        """
        j = self.jobs
        since = sa.func.now() - sa.bindparam("window", type_=sa.Float) * ONE_SECOND
        return (
            sa.select(j.c.queue, j.c.task_name, sa.func.count())
            .where(j.c.finished_at >= since, sa.func.isfinite(j.c.finished_at))
            .where(j.c.status != CANCELLED)
            .group_by(j.c.queue, j.c.task_name)
        )

    def _worker_columns(self) -> tuple[sa.ColumnElement[Any], ...]:
        """A worker's row as ``WorkerInfo`` reads it, its heartbeat's age last (on the
        database's clock)."""
        w = self.t.workers
        beat = _readable(w.c.last_heartbeat)
        return (
            w.c.id,
            w.c.hostname,
            w.c.pid,
            w.c.queues,
            _readable(w.c.started_at).label("started_at"),
            beat.label("last_heartbeat"),
            sa.cast(sa.extract("epoch", sa.func.now() - beat), sa.Float).label("heartbeat_age"),
        )

    @cached_property
    def worker_heartbeats(self) -> sa.Select[Any]:
        """Every registered worker, freshest heartbeat first (the health checks)."""
        columns = self._worker_columns()
        return sa.select(*columns).order_by(columns[-1], self.t.workers.c.id)

    @cached_property
    def workers_running(self) -> sa.Select[Any]:
        """Every worker with its heartbeat age and, one row each, the jobs it runs."""
        w, j = self.t.workers, self.jobs
        return (
            sa.select(
                *self._worker_columns(),
                j.c.id.label("job_id"),
                j.c.task_name,
                j.c.queue,
                _readable(j.c.started_at).label("job_started_at"),
            )
            .select_from(w.outerjoin(j, sa.and_(j.c.worker_id == w.c.id, j.c.status == DOING)))
            .order_by(w.c.started_at, w.c.id, j.c.id)
        )

    @cached_property
    def queue_rows(self) -> sa.Select[Any]:
        """Every queue the ``queues`` table holds (paused, resumed or limited once): known
        queues, shown by ``stats()`` with or without jobs; and whether each is paused."""
        q = self.t.queues
        return sa.select(q.c.name, q.c.paused)

    def delete_old(self, statuses: tuple[Status, ...], by_queue: bool) -> sa.Select[Any]:
        """Delete jobs that ended over ``:older_than`` seconds ago with one of ``statuses``,
        and their history; select how many jobs went."""
        found = self._built.get(("delete_old", statuses, by_queue))
        if found is None:
            j, events = self.jobs, self.t.job_events
            before = sa.func.now() - sa.bindparam("older_than", type_=sa.Float) * ONE_SECOND
            where = [j.c.finished_at < before, j.c.status.in_([_status(s) for s in statuses])]
            if by_queue:
                where.append(j.c.queue == sa.bindparam("only_queue", type_=sa.Text))
            gone = (
                sa.delete(j).where(*where).returning(j.c.id, j.c.status, j.c.children).cte("gone")
            )
            history = (
                sa.delete(events).where(events.c.job_id.in_(sa.select(gone.c.id))).cte("history")
            )
            counted = sa.select(sa.func.count().label("n")).select_from(gone).subquery("counted")
            found = self._forgetting(gone, sa.select(counted.c.n)).add_cte(history)
            self._built["delete_old", statuses, by_queue] = found
        return found

    @cached_property
    def cancel(self) -> sa.Select[Any]:
        return self._cancel(self._one_job())

    def _cancel(self, *where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        """``todo | blocked → cancelled``, the children of a cancelled parent settled
        (:meth:`_settling`); a running job is left alone (that is ``abort``). The cancelled
        jobs are announced on the done channel."""
        j = self.jobs
        changed = (
            sa.update(j)
            .where(*where, self._acting_on("cancel"))
            .values(status=CANCELLED, finished_at=sa.func.now())
            .returning(j.c.id, j.c.status, j.c.children)
            .cte("changed")
        )
        done = self._announce_done(changed, sa.true())
        cancelled = sa.select(changed.c.id).select_from(changed.outerjoin(done, sa.true()))
        return self._settled_after(changed, cancelled)

    def _delete(self, *where: sa.ColumnElement[bool]) -> sa.Select[Any]:
        """Delete jobs, never a running one (:data:`ACTS_ON`), and their history; select their
        ids. A job a worker claims meanwhile is skipped: PostgreSQL checks the WHERE again on
        the row the claim committed, and ``doing`` fails it."""
        j, events = self.jobs, self.t.job_events
        gone = (
            sa.delete(j)
            .where(*where, self._acting_on("delete"))
            .returning(j.c.id, j.c.status, j.c.children)
            .cte("gone")
        )
        history = sa.delete(events).where(events.c.job_id.in_(sa.select(gone.c.id))).cte("history")
        done = self._announce_done(gone, sa.true())  # a waiter of a deleted job stops waiting
        ids = sa.select(gone.c.id).select_from(gone.outerjoin(done, sa.true()))
        return self._forgetting(gone, ids).add_cte(history)

    def _forgetting(self, gone: sa.CTE, select: sa.Select[Any]) -> sa.Select[Any]:
        """``select`` with the edges of the deleted parents in ``gone`` (``id``, ``status``,
        ``children``) deleted in the same statement, and their children settled first
        (:meth:`_settling`): a parent deleted before it ended counts as cancelled, and one
        that ended badly cancels the children it held (nobody can retry it now). The edges
        naming a deleted child stay until their parent goes (its ``children`` counts them)."""
        e = self.t.job_dependencies
        parents = gone.c.children.is_not(None)
        ended = gone.c.status.in_(ENDED)
        finished = (
            sa.select(
                gone.c.id,
                sa.case((ended, gone.c.status), else_=CANCELLED).label("status"),
                gone.c.children,
                ended.label("ended"),
            )
            .where(parents)
            .cte("finished")
        )
        edges = (
            sa.delete(e)
            .where(e.c.parent_id.in_(sa.select(gone.c.id).where(parents)))
            .returning(e.c.parent_id)
            .cte("edges_gone")
        )
        done = select.subquery("forgetting")
        joined: Any = done
        for cte in self._settling(finished, gone=True):
            joined = joined.outerjoin(cte, sa.true())
        return sa.select(*done.c).select_from(joined).add_cte(edges)

    def bulk(self, action: Action, key: SelectionKey, preview: bool = False) -> Any:
        """``action`` on every job the filters of ``key`` select, selecting the ids it changed;
        ``preview``: only select the ids it would change now (the same WHERE)."""
        found = self._built.get(("bulk", action, key, preview))
        if found is None:
            where = self._selected(key)
            if preview:
                found = sa.select(self.jobs.c.id).where(*where, self._acting_on(action))
            else:
                build = {
                    "retry": self._retry,
                    "cancel": self._cancel,
                    "abort": self._abort,
                    "delete": self._delete,
                }[action]
                found = build(*where)
            self._built["bulk", action, key, preview] = found
        return found

    @cached_property
    def pause_queue(self) -> sa.Insert:
        """Mark a queue paused (workers stop claiming its jobs); returns a row if it changed."""
        q = self.t.queues
        insert = pg_insert(q).values(
            name=sa.bindparam("queue_name", type_=sa.Text), paused=True, paused_at=sa.func.now()
        )
        return insert.on_conflict_do_update(
            index_elements=[q.c.name],
            set_={"paused": True, "paused_at": sa.func.now()},
            where=~q.c.paused,
        ).returning(q.c.name)

    @cached_property
    def resume_queue(self) -> sa.Select[Any]:
        """Unpause a queue and NOTIFY its workers at once; returns how many rows changed."""
        q = self.t.queues
        changed = (
            sa.update(q)
            .where(q.c.name == sa.bindparam("queue_name", type_=sa.Text), q.c.paused)
            .values(paused=False, paused_at=sa.null())
            .returning(q.c.name)
            .cte("changed")
        )
        return sa.select(sa.func.count(sa.func.pg_notify(self.channel, changed.c.name)))

    @cached_property
    def declare_queues(self) -> ReturningInsert[Any]:
        """Record queues by name (a worker's tasks' declared queues, at its start), so tools
        that see only the database list them while idle; a queue already known is left as
        it is (paused, limits). Returns the names it added."""
        q = self.t.queues
        names = sa.select(sa.func.unnest(_array("queue_names", sa.Text())).label("name"))
        return (
            pg_insert(q)
            .from_select([q.c.name], names)
            .on_conflict_do_nothing(index_elements=[q.c.name])
            .returning(q.c.name)
        )

    @cached_property
    def list_queues(self) -> sa.Select[Any]:
        """Queues paused or resumed once, and queues with waiting or running jobs."""
        q, j = self.t.queues, self.jobs
        known = sa.union(
            sa.select(q.c.name),
            sa.select(j.c.queue).where(j.c.status == TODO).distinct(),
            sa.select(j.c.queue).where(j.c.status == DOING).distinct(),
        ).subquery("known")
        return (
            sa.select(known.c.name, sa.func.coalesce(q.c.paused, sa.false()), q.c.paused_at)
            .select_from(known.outerjoin(q, q.c.name == known.c.name))
            .order_by(known.c.name)
        )

    # -- periodic --------------------------------------------------------------------------
    # Ticks of periodic tasks (``pgtq/periodic.py``). A tick is deferred at most once ever:
    # its row in ``periodic_ticks`` is inserted ON CONFLICT DO NOTHING, and its job only
    # when that row was really inserted.

    def _due_ticks(self) -> sa.CTE:
        """The ticks of the parameters (a :class:`TickRows`), each with a job id drawn from
        the jobs' identity sequence first (materialized: it calls nextval and is read more
        than once), so the row that records a tick names its job in the same statement."""
        columns = (
            *INSERT_COLUMNS,
            ("periodic_id", sa.Text()),
            ("tick_at", sa.DateTime(timezone=True)),
        )
        rows = (
            sa.func.unnest(*(_array(new_param(name), kind) for name, kind in columns))
            .table_valued(*(sa.column(name, kind) for name, kind in columns))
            .render_derived("ticks_in")
        )
        sequence = sa.func.pg_get_serial_sequence(
            sa.literal_column(f"'{self.t.schema}.jobs'"), sa.literal_column("'id'")
        )
        return sa.select(rows, sa.func.nextval(sequence).label("job_id")).cte("due")

    def _insert_tick_jobs(self, due: sa.CTE, taken: sa.CTE | None) -> tuple[sa.CTE, sa.CTE]:
        """Insert the jobs of the ``due`` ticks (those whose ids ``taken`` returns, if given),
        as ``todo`` (like ``insert_jobs``, same columns), and notify each queue that got a due
        job: the ``inserted`` and ``sent`` CTEs."""
        j = self.jobs
        values = (
            sa.cast(due.c[n], JSONB) if n in JSON_COLUMNS else due.c[n] for n, _ in INSERT_COLUMNS
        )
        rows = sa.select(due.c.job_id, *values)
        if taken is not None:
            rows = rows.select_from(taken.join(due, due.c.job_id == taken.c.job_id))
        inserted = (
            sa.insert(j)
            .from_select(["id", *(name for name, _ in INSERT_COLUMNS)], rows)
            .returning(j.c.id, j.c.queue, j.c.scheduled_at)
            .cte("inserted")
        )
        queues = (
            sa.select(inserted.c.queue)
            .where(_due(inserted.c.scheduled_at))
            .distinct()
            .subquery("due_queues")
        )
        notify = sa.func.pg_notify(self._channel, queues.c.queue)
        return inserted, sa.select(sa.func.count(notify)).cte("sent")

    @cached_property
    def defer_ticks(self) -> sa.Select[Any]:
        """Defer many periodic ticks in one statement, each at most once however many
        schedulers race for it; selects the ticks this statement deferred, with their jobs.

        A tick of a paused schedule, or one before the schedule was last resumed (a resumed
        schedule does not backfill), is skipped: the schedules' state (``periodic_schedules``,
        pgtq_0007) is read here, in the statement every scheduler runs anyway, so a pause
        holds for the whole fleet at no extra round trip. It is read ``FOR SHARE``: a pause
        (an update of that row) waits for a statement that read the row before it, and a
        statement that comes to the row while a pause is pending waits and reads the paused
        row. So once ``pause`` returns, no scheduler defers a tick of that schedule (the
        schedulers register their schedules' rows when they start, so the pause is an
        update; see :meth:`register_schedules`).
        """
        p, state = self.t.periodic_ticks, self.t.periodic_schedules
        due = self._due_ticks()
        held = (
            sa.select(state.c.task_name, state.c.periodic_id, state.c.paused, state.c.resumed_at)
            .where(
                sa.tuple_(state.c.task_name, state.c.periodic_id).in_(
                    sa.select(due.c.task_name, due.c.periodic_id)
                )
            )
            .with_for_update(read=True)
            .cte("held")
        )
        skipped = sa.exists().where(
            held.c.task_name == due.c.task_name,
            held.c.periodic_id == due.c.periodic_id,
            sa.or_(held.c.paused, due.c.tick_at < held.c.resumed_at),
        )
        claimed = (
            pg_insert(p)
            .from_select(
                ["task_name", "periodic_id", "tick_at", "job_id"],
                sa.select(due.c.task_name, due.c.periodic_id, due.c.tick_at, due.c.job_id).where(
                    ~skipped
                ),
            )
            .on_conflict_do_nothing(index_elements=[p.c.task_name, p.c.periodic_id, p.c.tick_at])
            .returning(p.c.task_name, p.c.periodic_id, p.c.tick_at, p.c.job_id)
            .cte("claimed")
        )
        inserted, sent = self._insert_tick_jobs(due, claimed)
        return (
            sa.select(claimed.c.task_name, claimed.c.periodic_id, claimed.c.tick_at, inserted.c.id)
            .select_from(
                claimed.join(inserted, inserted.c.id == claimed.c.job_id).join(sent, sa.true())
            )
            .order_by(claimed.c.tick_at, claimed.c.task_name, claimed.c.periodic_id)
        )

    # -- periodic control (pgtq_0007): the run-time state of each schedule --------------------
    # ``:schedule_task`` / ``:schedule_id`` name one schedule, never ``:task_name`` /
    # ``:periodic_id`` (columns these statements write: see the module's docstring).

    def _schedule_is(self, table: sa.Table) -> sa.ColumnElement[bool]:
        return sa.and_(
            table.c.task_name == sa.bindparam("schedule_task", type_=sa.Text),
            table.c.periodic_id == sa.bindparam("schedule_id", type_=sa.Text),
        )

    @cached_property
    def register_schedules(self) -> ReturningInsert[Any]:
        """Give each schedule a row (a scheduler's schedules, when it starts), so that a pause
        is an update the tick statement's ``FOR SHARE`` waits for; a row already there is
        left as it is. Returns the schedules it added."""
        state = self.t.periodic_schedules
        keys = sa.select(
            sa.func.unnest(_array("schedule_tasks", sa.Text())).label("task_name"),
            sa.func.unnest(_array("schedule_ids", sa.Text())).label("periodic_id"),
        )
        return (
            pg_insert(state)
            .from_select([state.c.task_name, state.c.periodic_id], keys)
            .on_conflict_do_nothing(index_elements=[state.c.task_name, state.c.periodic_id])
            .returning(state.c.task_name, state.c.periodic_id)
        )

    @cached_property
    def pause_schedule(self) -> ReturningInsert[Any]:
        """Mark a schedule paused (no scheduler defers its ticks); returns a row if it changed."""
        state = self.t.periodic_schedules
        insert = pg_insert(state).values(
            task_name=sa.bindparam("schedule_task", type_=sa.Text),
            periodic_id=sa.bindparam("schedule_id", type_=sa.Text),
            paused=True,
            paused_at=sa.func.now(),
        )
        return insert.on_conflict_do_update(
            index_elements=[state.c.task_name, state.c.periodic_id],
            set_={"paused": True, "paused_at": sa.func.now()},
            where=~state.c.paused,
        ).returning(state.c.task_name)

    @cached_property
    def resume_schedule(self) -> ReturningUpdate[Any]:
        """Unpause a schedule from now on: ``resumed_at`` keeps the ticks it skipped from ever
        being deferred. Returns a row if it changed."""
        state = self.t.periodic_schedules
        return (
            sa.update(state)
            .where(self._schedule_is(state), state.c.paused)
            .values(paused=False, paused_at=sa.null(), resumed_at=sa.func.now())
            .returning(state.c.task_name)
        )

    @cached_property
    def run_schedule_now(self) -> sa.Select[Any]:
        """Defer one job of a schedule now (one :class:`TickRows` row: its tick is the
        moment asked), paused or not, and record it in the schedule's row (``run_now_at``,
        ``run_now_job_id``); selects the job's id. It takes no ``periodic_ticks`` row: it is
        no tick, and a tick row at that instant would make the schedulers skip a scheduled
        tick that falls on it."""
        state = self.t.periodic_schedules
        due = self._due_ticks()
        inserted, sent = self._insert_tick_jobs(due, None)
        insert = pg_insert(state)
        recorded = (
            insert.from_select(
                ["task_name", "periodic_id", "run_now_at", "run_now_job_id"],
                sa.select(
                    due.c.task_name, due.c.periodic_id, due.c.tick_at, inserted.c.id
                ).select_from(due.join(inserted, inserted.c.id == due.c.job_id)),
            )
            .on_conflict_do_update(
                index_elements=[state.c.task_name, state.c.periodic_id],
                set_={
                    "run_now_at": insert.excluded.run_now_at,
                    "run_now_job_id": insert.excluded.run_now_job_id,
                },
            )
            .returning(state.c.run_now_job_id)
            .cte("recorded")
        )
        return sa.select(recorded.c.run_now_job_id).select_from(recorded.join(sent, sa.true()))

    @cached_property
    def schedule_states(self) -> sa.Select[Any]:
        """The state of each schedule named by ``:schedule_tasks`` / ``:schedule_ids`` (none
        recorded: NULLs) and its last tick (a backward scan of ``periodic_ticks``' primary
        key per schedule)."""
        state, ticks = self.t.periodic_schedules, self.t.periodic_ticks
        keys = (
            sa.func.unnest(_array("schedule_tasks", sa.Text()), _array("schedule_ids", sa.Text()))
            .table_valued(sa.column("task_name", sa.Text), sa.column("periodic_id", sa.Text))
            .render_derived("schedules")
        )
        last = (
            sa.select(ticks.c.tick_at, ticks.c.job_id)
            .where(ticks.c.task_name == keys.c.task_name, ticks.c.periodic_id == keys.c.periodic_id)
            .order_by(ticks.c.tick_at.desc())
            .limit(sa.literal_column("1"))
            .lateral("last_tick")
        )
        return sa.select(
            keys.c.task_name,
            keys.c.periodic_id,
            sa.func.coalesce(state.c.paused, sa.false()),
            state.c.paused_at,
            state.c.resumed_at,
            state.c.run_now_at,
            state.c.run_now_job_id,
            last.c.tick_at,
            last.c.job_id,
        ).select_from(
            keys.outerjoin(
                state,
                sa.and_(
                    state.c.task_name == keys.c.task_name,
                    state.c.periodic_id == keys.c.periodic_id,
                ),
            ).outerjoin(last, sa.true())
        )

    @cached_property
    def delete_old_ticks(self) -> sa.Select[Any]:
        """Forget ticks older than ``:older_than`` seconds (no scheduler defers them again);
        select how many went."""
        p = self.t.periodic_ticks
        before = sa.func.now() - sa.bindparam("older_than", type_=sa.Float) * ONE_SECOND
        gone = sa.delete(p).where(p.c.tick_at < before).returning(p.c.tick_at).cte("gone")
        return sa.select(sa.func.count()).select_from(gone)

    # == web dashboard (pgtq.web): reads behind its pages =======================================
    # Only reads; its actions (retry, abort, cancel, pause, resume) are the statements above.

    def throughput(self, by_queue: bool) -> sa.Select[Any]:
        """Jobs that ended per ``:bucket`` seconds over the last ``:window`` seconds, by status:
        one row per (bucket, status), and one row with no status for a bucket with no job.

        Buckets are numbered ``floor(epoch / bucket)``. Like the rates of ``stats()``, the jobs
        are a range of ``jobs_finished_at_idx``: the cost grows with the jobs that ended in the
        window, never with the table. Cancelled jobs never ran and are not counted.
        """
        found = self._built.get(("throughput", by_queue))
        if found is None:
            j = self.jobs
            bucket = sa.bindparam("bucket", type_=sa.Float)
            since = sa.func.now() - sa.bindparam("window", type_=sa.Float) * ONE_SECOND

            def slot(at: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
                epoch = sa.cast(sa.extract("epoch", at), sa.Float)
                return sa.cast(sa.func.floor(epoch / bucket), sa.BigInteger)

            # Finite: an ``infinity`` written by other means has no bucket (its number
            # would overflow).
            where = [j.c.finished_at >= since, j.c.status != CANCELLED]
            where.append(sa.func.isfinite(j.c.finished_at))
            if by_queue:
                where.append(j.c.queue == sa.bindparam("queue", type_=sa.Text))
            ended = slot(j.c.finished_at).label("slot")
            done = (
                sa.select(ended, j.c.status, sa.func.count().label("n"))
                .where(*where)
                .group_by(ended, j.c.status)
                .subquery("done")
            )
            slots = (
                sa.func.generate_series(slot(since), slot(sa.func.now()))
                .table_valued(sa.column("slot", sa.BigInteger))
                .render_derived("slots")
            )
            found = (
                sa.select(slots.c.slot, done.c.status, sa.func.coalesce(done.c.n, 0))
                .select_from(slots.outerjoin(done, done.c.slot == slots.c.slot))
                .order_by(slots.c.slot, done.c.status)
            )
            self._built["throughput", by_queue] = found
        return found


@cache
def statements_for(schema: str) -> Statements:
    return Statements(tables_for(schema))


# -- row mappers (pure) ------------------------------------------------------------------------


def to_job(row: Row) -> Job:
    """A row of ``Statements.job_columns`` (``Job``'s fields in order) as a ``Job``.

    Its times (``scheduled_at``, ``created_at``, ``started_at``, ``finished_at``) are aware
    datetimes or None. A time the row holds outside :data:`READ_TIME_MIN` ..
    :data:`READ_TIME_MAX` (``-infinity`` / ``infinity`` or a year beyond 9999, written by other
    means than ``defer``) is read as that bound: ``scheduled_at=-infinity`` (due since always,
    claimed like an unscheduled job) reads as 0001-01-02 UTC, ``infinity`` (never due) as
    9999-12-30 UTC, the same on psycopg and asyncpg.
    """
    return Job(row[0], row[1], row[2], row[3], Status(row[4]), *row[5:])


def to_claimed(row: Row) -> ClaimedJob:
    return ClaimedJob._make(row[: len(ClaimedJob._fields)])


def claimed_in_order(rows: Rows) -> list[ClaimedJob]:
    """Claimed jobs in the order they start: priority first, then the oldest. (The claim
    returns exactly a ``ClaimedJob``'s columns.)"""
    make = ClaimedJob._make
    jobs = [make(row) for row in rows]
    jobs.sort(key=_start_order)
    return jobs


def _start_order(job: ClaimedJob) -> tuple[int, int]:
    return -job.priority, job.id


# -- queries: statement + parameters + mapper, run by either connector ------------------------


@dataclass(frozen=True, slots=True)
class JobRows:
    """Parallel arrays of encoded jobs, one job each (periodic ticks: ``defer_ticks``)."""

    queue: list[str]
    task_name: list[str]
    args: list[str]
    priority: list[int]
    scheduled_at: list[datetime | None]
    lock: list[str | None]
    queueing_lock: list[str | None]
    concurrency_key: list[str | None]
    trace_context: list[str | None]

    @classmethod
    def empty(cls) -> JobRows:
        return cls(*([] for _ in INSERT_COLUMNS))

    def as_params(self) -> dict[str, Any]:
        params = {new_param(name): getattr(self, name) for name, _ in INSERT_COLUMNS}
        _same_lengths("JobRows", params)
        return params


@dataclass(slots=True)  # made per defer: not frozen, for the cheaper __init__ (see Query)
class NewJobs:
    """The jobs of one ``defer`` or ``defer_many`` call: the options they share, and their
    arguments as one JSON array, an object a job (the parameters of ``insert_jobs``)."""

    queue: str
    task_name: str
    priority: int
    scheduled_at: datetime | None  # an instant the caller gave
    schedule_in: float | None  # or seconds from the server's now()
    lock: str | None
    queueing_lock: str | None
    concurrency_key: str | None
    trace_context: str | None  # JSON
    args: str  # JSON: [{...}, ...]
    count: int

    def as_params(self) -> dict[str, Any]:
        return {  # the names new_param gives, written out: this runs at every defer
            "new_queue": self.queue,
            "new_task_name": self.task_name,
            "new_args": self.args,
            "new_priority": self.priority,
            "new_scheduled_at": self.scheduled_at,
            "schedule_in": self.schedule_in,
            "new_lock": self.lock,
            "new_queueing_lock": self.queueing_lock,
            "new_concurrency_key": self.concurrency_key,
            "new_trace_context": self.trace_context,
            "new_count": self.count,
        }


def insert_jobs(s: Statements, new: NewJobs) -> Query[list[int]]:
    """The new jobs' ids, in the order of their arguments."""
    return Query(s.insert_jobs, new.as_params(), _id_list, driver=True)


def insert_keyed_job(
    s: Statements, new: NewJobs, *, replace: bool, unique_for: float | None = None
) -> Query[tuple[int, bool] | None]:
    """A job with a ``queueing_lock`` (unique among waiting jobs, or per period of
    ``unique_for`` seconds): (its id, new) or (the id of the job holding the key, not new);
    None when ``replace`` met a job it may not replace."""

    def mapper(rows: Rows) -> tuple[int, bool] | None:
        return (rows[0][0], bool(rows[0][1])) if rows else None

    params = new.as_params()
    if unique_for is not None:
        params["unique_for"] = unique_for
    statement = s.insert_keyed(Conflict(replace, unique_for is not None))
    return Query(statement, params, mapper, driver=True)


class EachRow(NamedTuple):
    """One job of :meth:`Statements.insert_each`, options and arguments checked."""

    mode: EachMode
    queue: str
    priority: int
    args: Mapping[str, Any]
    scheduled_at: datetime | None = None  # an instant the caller gave
    schedule_in: float | None = None  # or seconds from the server's now()
    lock: str | None = None
    queueing_lock: str | None = None
    concurrency_key: str | None = None
    unique_for: float | None = None
    tags: Sequence[str] | None = None
    meta: Mapping[str, Any] | None = None
    timeout: float | None = None
    max_attempts: int | None = None

    def space(self) -> tuple[str, str] | None:
        """The key this row holds, in the index that holds it (``lock``: among waiting
        jobs; ``period``: per period, whatever the period's length), or None without one."""
        if self.queueing_lock is None:
            return None
        return ("period" if self.unique_for is not None else "lock", self.queueing_lock)


class Written(NamedTuple):
    """What ``insert_each`` did for one position of its call: the job's id, whether it is
    new, and whether it replaced a waiting job's arguments (``on_conflict="replace"``)."""

    id: int
    fresh: bool
    replaced: bool = False


@dataclass(slots=True)
class EachJobs:
    """The parameters of ``insert_each`` and how its rows map back to the positions of the
    call: made by :meth:`make`, read by :func:`each_written`."""

    task_name: str
    trace_context: str | None  # JSON
    rows: str  # JSON: [{"n": ..., "mode": ..., ...}, ...], the written positions only
    modes: tuple[EachMode, ...]
    #: Per position of the call, the position whose job it reports (itself when written).
    reports: list[int]
    #: The positions of the plain rows, in order (their ids come back in this order).
    plain: list[int]
    #: ``EachRow.space()`` → the position written with that key.
    keyed: dict[tuple[str, str], int]

    @classmethod
    def make(
        cls,
        task_name: str,
        trace_context: str | None,
        rows: Sequence[EachRow],
        reports: Sequence[int],
    ) -> EachJobs:
        """``rows``: one per position; ``reports``: per position, the position written for
        it, each key written once (:func:`pgtq.tasks.resolve_keys`)."""
        encoded: list[dict[str, Any]] = []
        modes: set[EachMode] = set()
        plain: list[int] = []
        keyed: dict[tuple[str, str], int] = {}
        for n, row in enumerate(rows):
            if reports[n] != n:
                continue
            space = row.space()
            if space is None:
                plain.append(n)
            elif keyed.setdefault(space, n) != n:
                raise ValueError(f"EachJobs: the key {space} is written twice")
            modes.add(row.mode)
            fields = {"n": n, **{k: v for k, v in row._asdict().items() if v is not None}}
            if row.scheduled_at is not None:
                fields["scheduled_at"] = row.scheduled_at.isoformat()
            encoded.append(fields)
        return cls(
            task_name=task_name,
            trace_context=trace_context,
            rows=dumps(encoded),
            modes=tuple(m for m in EACH_MODES if m in modes),
            reports=list(reports),
            plain=plain,
            keyed=keyed,
        )

    def as_params(self) -> dict[str, Any]:
        return {
            "new_jobs": self.rows,
            "new_task_name": self.task_name,
            "new_trace_context": self.trace_context,
        }


def each_written(each: EachJobs, rows: Rows) -> list[Written]:
    """Per position of the call, what ``insert_each`` did (pure): plain rows by ascending
    id (inserted in position order), keyed ones by their key; a position that reports
    another one gets that job, as a duplicate."""
    done: dict[int, Written] = {}
    plain_ids = sorted(row[1] for row in rows if row[0] == "plain")
    done.update(zip(each.plain, (Written(i, True) for i in plain_ids), strict=True))
    for kind, job_id, key, fresh, replaced in rows:
        if kind == "plain":
            continue
        if kind == "period":  # <queueing_lock>@<period number>
            key = key.rpartition("@")[0]
        done[each.keyed[kind, key]] = Written(job_id, bool(fresh), bool(replaced))
    return [
        done[n] if written == n else Written(done[written].id, False)
        for n, written in enumerate(each.reports)
    ]


def insert_each_jobs(s: Statements, each: EachJobs) -> Query[list[Written]]:
    """Jobs with options of their own (:meth:`Statements.insert_each`): per position of the
    call, what was written for it."""

    def mapper(rows: Rows) -> list[Written]:
        return each_written(each, rows)

    return Query(s.insert_each(each.modes), each.as_params(), mapper, driver=True)


@dataclass(slots=True)
class WorkflowJobs:
    """The parameters of ``insert_workflow``: its jobs (one JSON object each, with ``n``, its
    position, and ``task_name``) and edges, as JSON arrays."""

    jobs: str
    edges: str
    trace_context: str | None = None
    #: A batch's member: written only while this batch is open.
    open_batch: int | None = None

    def as_params(self) -> dict[str, Any]:
        return {
            "new_jobs": self.jobs,
            "new_edges": self.edges,
            "new_trace_context": self.trace_context,
            "open_batch": self.open_batch,
        }


def insert_workflow(s: Statements, workflow: WorkflowJobs) -> Query[list[int]]:
    """The new jobs' ids in position order; empty when a parent id names no job (nothing was
    written)."""
    return Query(s.insert_workflow, workflow.as_params(), _id_list, driver=True)


def close_batch(s: Statements, batch_id: int, failed: bool = False) -> Query[bool]:
    """True when the batch was open (its record blocked) and is now closed."""
    return Query(s.close_batch, {"batch_id": batch_id, "batch_failed": failed}, bool)


def parent_results(s: Statements, job_id: int) -> Query[dict[int, Any]]:
    """The results of the job's parents, by id, in id order (a parent not succeeded: None)."""

    def mapper(rows: Rows) -> dict[int, Any]:
        return {row[0]: row[2] for row in rows}

    return Query(s.parent_results, {"job_id": job_id}, mapper)


class Dependency(NamedTuple):
    """An edge of a job: its parent or child (``kind``), that job's id, task and status."""

    kind: Literal["parent", "child"]
    id: int
    task_name: str
    status: Status
    on_parent_failure: str


def dependencies(s: Statements, job_id: int) -> Query[list[Dependency]]:
    """A job's parents, then its children."""

    def mapper(rows: Rows) -> list[Dependency]:
        return [Dependency(r[0], r[1], r[2], Status(r[3]), r[4]) for r in rows]

    return Query(s.dependencies, {"job_id": job_id}, mapper)


def workflow_edges(s: Statements, workflow_id: int) -> Query[list[tuple[int, int]]]:
    """The edges ``(parent, child)`` among a workflow's jobs."""

    def mapper(rows: Rows) -> list[tuple[int, int]]:
        return [(r[0], r[1]) for r in rows]

    return Query(s.workflow_edges, {"only_workflow": workflow_id}, mapper)


def get_job(s: Statements, job_id: int) -> Query[Job | None]:
    def mapper(rows: Rows) -> Job | None:
        return to_job(rows[0]) if rows else None

    return Query(s.get, {"job_id": job_id}, mapper)


def claim_jobs(
    s: Statements,
    worker_id: str,
    queues: Sequence[str] | None,
    limit: int,
    answer: Answer | None = None,
) -> Query[list[ClaimedJob]]:
    """Claim up to ``limit`` jobs; ``answer``: the announcements this claim answers, whose
    queue it announces again if more wait (:meth:`Statements._answering`)."""
    params: dict[str, Any] = {"me": worker_id}
    if queues and len(queues) == 1:
        params["only_queue"] = queues[0]
    elif queues:
        params["queues"] = list(queues)
    _answer_params(params, limit, answer)
    statement = s.claim(queues, limit, answering=answer is not None)
    return Query(statement, params, claimed_in_order, driver=True)


def _answer_params(params: dict[str, Any], limit: int, answer: Answer | None) -> None:
    if answer is not None:
        params.update(asked=limit, named=answer.jobs, announce_queue=answer.queue)


def announce(s: Statements, queue: str) -> Query[None]:
    return Query(s.announce, {"announce_queue": queue}, _no_value)


class Conflict(NamedTuple):
    """What a keyed insert does when the key is held (``Statements.insert_keyed``)."""

    replace: bool = False  # update the holding job (else keep it)
    per_period: bool = False  # the key is unique per period (``unique_for``), in unique_key


class Rare(NamedTuple):
    """The rare outcomes a batch holds, each needing a variant of the completion statement
    (``progress``: outcomes with their job's last progress; ``running``: progress of jobs
    still running goes with the batch)."""

    snoozing: bool = False
    moving: bool = False
    progress: bool = False
    running: bool = False
    #: Jobs with children (``jobs.children`` set), which every other variant refuses: this
    #: one writes them and settles their children in the same statement.
    releasing: bool = False

    def __bool__(self) -> bool:
        return self.snoozing or self.moving or self.progress or self.running or self.releasing


_NOTHING_RARE = Rare()


@dataclass(slots=True)
class Outcomes:
    """Finished attempts waiting to be written, as parallel arrays (one ``complete`` each)."""

    ids: list[int]
    attempts: list[int | None]
    statuses: list[str]
    results: list[str | None]
    errors: list[str | None]
    retry_in: list[float | None]
    #: Retries that move their job: id → (queue, priority), None for either that stays.
    moves: dict[int, tuple[str | None, int | None]] = field(default_factory=dict)
    #: The last ``ctx.set_progress`` of a finishing job not written yet: id → JSON text.
    progress: dict[int, str] = field(default_factory=dict)

    @classmethod
    def empty(cls) -> Outcomes:
        return cls([], [], [], [], [], [])

    def add(
        self,
        job_id: int,
        status: Status,
        result: str | None = None,
        error: str | None = None,
        retry_in: float | None = None,
        *,
        attempt: int | None = None,
    ) -> None:
        """``attempt``: the attempt this outcome is of (written only while it is the job's
        current one); None skips that check."""
        self.append(job_id, attempt, status.value, result, error, retry_in)

    def append(
        self,
        job_id: int,
        attempt: int | None,
        status: str,
        result: str | None,
        error: str | None,
        retry_in: float | None,
    ) -> None:
        """``add`` for the worker's hot path: positional, the status already a string."""
        self.ids.append(job_id)
        self.attempts.append(attempt)
        self.statuses.append(status)
        self.results.append(result)
        self.errors.append(error)
        self.retry_in.append(retry_in)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class Progress:
    """The latest progress of running jobs, as parallel arrays: the attempt that reported
    each, and its record as JSON text (:func:`pgtq.jobs.progress_record`)."""

    ids: list[int]
    attempts: list[int]
    values: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def as_params(self) -> dict[str, Any]:
        arrays = {
            "progress_ids": self.ids,
            "progress_attempts": self.attempts,
            "progress_values": self.values,
        }
        _same_lengths("Progress", arrays)
        return arrays


def write_progress(s: Statements, worker_id: str, progress: Progress) -> Query[list[int]]:
    """Write running jobs' progress alone (no outcome waits): the ids it wrote."""
    return Query(s.set_progress, {"me": worker_id, **progress.as_params()}, _id_list, driver=True)


def complete_jobs(
    s: Statements,
    worker_id: str,
    outcomes: Outcomes,
    delete_statuses: Sequence[str] = (),
    progress: Progress | None = None,
    quiet: bool = False,
    *,
    releasing: bool = False,
) -> Query[list[int]]:
    """Write outcomes; jobs ending in ``delete_statuses`` are deleted instead. ``progress``:
    of jobs still running (none of the outcomes'), in the same statement. ``quiet``: no
    NOTIFY of the jobs that ended (``App(notify_completions=False)``). The ids written come
    back: a job with children is not among them unless ``releasing`` (the variant that
    settles its children); write those again with it (:func:`refused_outcomes`)."""
    arrays: dict[str, list[Any]] = {
        "ids": outcomes.ids,
        "outcome_attempts": outcomes.attempts,
        "statuses": outcomes.statuses,
        "results": outcomes.results,
        "errors": outcomes.errors,
        "retry_in": outcomes.retry_in,
    }
    _same_lengths("Outcomes", arrays)
    params: dict[str, Any] = {"me": worker_id, **arrays}
    snoozing = SNOOZED in outcomes.statuses
    if snoozing or outcomes.moves or outcomes.progress or progress is not None or releasing:
        rare = Rare(
            snoozing,
            bool(outcomes.moves),
            bool(outcomes.progress),
            progress is not None,
            releasing,
        )
    else:
        rare = _NOTHING_RARE  # nearly every batch: no tuple made
    if rare.moving:
        stay = (None, None)
        params["queues"] = [outcomes.moves.get(i, stay)[0] for i in outcomes.ids]
        params["priorities"] = [outcomes.moves.get(i, stay)[1] for i in outcomes.ids]
    if rare.progress:
        params["outcome_progress"] = [outcomes.progress.get(i) for i in outcomes.ids]
    if progress is not None:
        params.update(progress.as_params())
    if delete_statuses:
        params["delete_statuses"] = list(delete_statuses)
    return Query(s.completion(bool(delete_statuses), rare, quiet), params, _id_list, driver=True)


def watcher_up(s: Statements, watcher_id: str, ttl: float) -> Query[None]:
    """Say watcher ``watcher_id`` listens for ``ttl`` seconds (see ``Statements.watcher_up``)."""
    return Query(s.watcher_up, {"watcher_id": watcher_id, "watcher_ttl": ttl}, _no_value)


def watcher_down(s: Statements, watcher_id: str) -> Query[None]:
    """Say watcher ``watcher_id`` no longer listens."""
    return Query(s.watcher_down, {"watcher_id": watcher_id}, _no_value)


def ended_among(s: Statements, watched: Iterable[int]) -> Query[list[int]]:
    """Which of the ``watched`` jobs are neither waiting nor running (ended, or gone)."""
    return Query(s.ended_among, {"watched": list(watched)}, _id_list)


def parse_done(payload: str) -> list[int] | None:
    """Read a NOTIFY on the done channel: the ids of the jobs that ended, or None for
    :data:`DONE_MANY` (or a payload this version cannot read): any watched job may have."""
    if payload == DONE_MANY:
        return None
    try:
        return [int(part) for part in payload.split(",")]
    except ValueError:
        return None


def refused_outcomes(outcomes: Outcomes, written: Sequence[int]) -> Outcomes | None:
    """The outcomes a completion did not write (pure): None when it wrote them all (nearly
    always: one length test). The rest are of jobs with children, or of jobs no longer this
    worker's (rescued meanwhile): written again with ``complete_jobs(..., releasing=True)``,
    which settles the former's children and leaves the latter alone."""
    if len(written) == len(outcomes):
        return None
    done = set(written)
    rest = [i for i, job_id in enumerate(outcomes.ids) if job_id not in done]
    if not rest:
        return None
    picked = Outcomes.empty()
    for i in rest:
        job_id = outcomes.ids[i]
        picked.append(
            job_id,
            outcomes.attempts[i],
            outcomes.statuses[i],
            outcomes.results[i],
            outcomes.errors[i],
            outcomes.retry_in[i],
        )
        if job_id in outcomes.moves:
            picked.moves[job_id] = outcomes.moves[job_id]
        if job_id in outcomes.progress:
            picked.progress[job_id] = outcomes.progress[job_id]
    return picked


def release_jobs(s: Statements, worker_id: str, ids: Sequence[int]) -> Query[list[int]]:
    return Query(s.release, {"me": worker_id, "ids": list(ids)}, _id_list, driver=True)


def release_unknown_jobs(s: Statements, worker_id: str, known: Iterable[int]) -> Query[list[int]]:
    return Query(s.release_unknown, {"me": worker_id, "known": list(known)}, _id_list)


def fail_unclaimable_jobs(
    s: Statements, queues: Sequence[str] | None = None, *, scan: int = 1000
) -> Query[list[int]]:
    """Fail the waiting jobs that make every claim fail; their ids, sorted.

    A row written by other means than ``defer`` (plain SQL, an older pgtq, a restored dump)
    can hold a value the claim cannot write: a ``lock`` or ``concurrency_key`` over
    :data:`INDEXED_VALUE_LIMIT` bytes as stored (the claim puts it in a btree index:
    "index row size … exceeds btree version 4 maximum 2704", or "index row requires … bytes,
    maximum size is 8191"), ``attempts`` at the largest integer ("integer out of range"), or
    arguments the driver's JSON decoding refuses once the claim has run (``RecursionError``
    for nesting over :data:`MAX_JSON_DEPTH`, ``ValueError`` for an integer of over 4,300
    digits: raised in the client, the claimed jobs are left ``doing``, to be released). The
    claim then fails whichever jobs it picked, every time. Run this after a claim failed so
    (SQLSTATE class ``54`` program limit exceeded, or ``22`` data exception, or those two
    client errors; not a lost connection), with the worker's ``queues`` (None: every queue),
    then claim again. It looks at the first ``scan`` due waiting jobs in claim order (cheap
    whatever the table's size; a claim takes its jobs among them). Each such job goes
    ``todo → failed`` with the error record ``{"type": "UnclaimableJob", "message": "this job
    cannot be claimed: lock is 3200 bytes (3200 as stored), over the limit of 2692 bytes
    (…)"}``, shown by ``jobs.get`` and ``jobs.history`` like any failure. Healthy jobs are not
    touched; an empty list means the claim failed for another reason.
    """
    params: dict[str, Any] = {"scan": scan}
    if queues:
        params["queues"] = list(queues)
    return Query(s.fail_unclaimable(bool(queues)), params, _id_list)


def no_such_job(s: Statements, like: Query[T]) -> Query[T]:
    """``like`` about a job that does not exist: its mapper given no row (``get`` → None,
    ``retry`` → False, ``history`` → []), for an id outside the ids' range (a bigint)."""
    return Query(s.no_rows, {}, like.mapper)


def abort_job(s: Statements, job_id: int) -> Query[Status | None]:
    """The job's status after the request (``cancelled`` or ``doing``), None if already final."""

    def mapper(rows: Rows) -> Status | None:
        return Status(rows[0][1]) if rows else None  # (id, status, queue)

    return Query(s.abort, {"job_id": job_id}, mapper)


def retry_job(s: Statements, job_id: int) -> Query[bool]:
    return Query(s.retry, {"job_id": job_id}, bool)


def reschedule_job(
    s: Statements,
    job_id: int,
    at: datetime | None = None,
    seconds: float | None = None,
    priority: int | None = None,
) -> Query[bool]:
    """Move a waiting job: to ``at``, or ``seconds`` from the server's now, and/or to
    ``priority`` (None: that stays). True when it was waiting (:meth:`Statements.reschedule`)."""
    params = {
        "job_id": job_id,
        "new_scheduled_at": at,
        "new_schedule_in": seconds,
        "new_priority": priority,
    }
    return Query(s.reschedule, params, bool)


def fail_job(s: Statements, job_id: int, reason: str) -> Query[tuple[Status | None, bool]]:
    """(the job's status as found, None: no such job; whether this failed it)."""

    def mapper(rows: Rows) -> tuple[Status | None, bool]:
        if not rows:
            return None, False
        return Status(rows[0][0]), rows[0][1] is not None

    return Query(s.fail, {"fail_id": job_id, "reason": reason}, mapper)


def abort_requested_ids(s: Statements, worker_id: str) -> Query[list[int]]:
    return Query(s.abort_requested, {"me": worker_id}, _id_list)


class Announcement(NamedTuple):
    """A NOTIFY on the jobs' channel (sent by ``insert_jobs``)."""

    queue: str
    #: Seconds until the jobs are due (``@<seconds> <queue>``); None: due now.
    due_in: float | None = None
    #: The first job id and the number of jobs of an insert due now (``#<id>:<count> <queue>``):
    #: idle workers answer it by turns (:mod:`pgtq.turns`). None: a bare ``<queue>`` (a retry,
    #: a resumed queue, a periodic tick, an older pgtq, or "more may wait"): everyone answers.
    first: int | None = None
    jobs: int = 0


def parse_announcement(payload: str) -> Announcement:
    """Read a NOTIFY on the jobs' channel; a payload of neither marked form is a queue name."""
    mark = payload[:1]
    if mark in ("@", "#"):
        head, _, queue = payload[1:].partition(" ")
        try:
            if mark == "@":
                return Announcement(queue, due_in=float(head))
            first, _, count = head.partition(":")
            return Announcement(queue, first=int(first), jobs=int(count))
        except ValueError:
            pass
    return Announcement(payload)


def next_due_in(s: Statements, queues: Sequence[str] | None) -> Query[float | None]:
    """Seconds until the earliest waiting job of ``queues`` (None: all) becomes due."""

    def mapper(rows: Rows) -> float | None:
        value = _one_or_none(rows)
        return None if value is None else float(value)

    return Query(s.next_due, {"due_queues": list(queues) if queues else None}, mapper)


def make_due(s: Statements, queues: Sequence[str] | None) -> Query[list[int]]:
    """Waiting jobs of ``queues`` (None: all) scheduled ahead, due now; their ids."""
    return Query(s.make_due, {"due_queues": list(queues) if queues else None}, _id_list)


def is_migrated(s: Statements) -> Query[bool]:
    return Query(s.migrated, {}, lambda r: bool(_one_or_none(r)))


def status_counts(s: Statements) -> Query[dict[tuple[str, Status], int]]:
    def mapper(rows: Rows) -> dict[tuple[str, Status], int]:
        return {(queue, Status(status)): count for queue, status, count in rows}

    return Query(s.status_counts, {}, mapper)


def status_counts_of(s: Statements, ids: Sequence[int]) -> Query[dict[Status, tuple[int, int]]]:
    def mapper(rows: Rows) -> dict[Status, tuple[int, int]]:
        return {Status(row[0]): (row[1], row[2]) for row in rows}

    return Query(s.status_counts_of, {"ids": list(ids)}, mapper)


def register_worker(
    s: Statements, worker_id: str, hostname: str, pid: int, queues: Sequence[str] | None
) -> Query[int]:
    params = {
        "me": worker_id,
        "worker_hostname": hostname,
        "worker_pid": pid,
        "worker_queues": list(queues) if queues else None,
    }
    return Query(s.register_worker, params, _count)


def heartbeat(s: Statements, worker_id: str) -> Query[int]:
    return Query(s.heartbeat, {"me": worker_id}, _count)


def job_history(s: Statements, job_id: int) -> Query[list[JobEvent]]:
    return Query(s.job_history, {"job_id": job_id}, lambda rows: [JobEvent(*r) for r in rows])


def set_history(s: Statements, enabled: bool) -> Query[None]:
    return Query(s.set_history(enabled), {}, _no_value)


# -- limits -----------------------------------------------------------------------------------


class LimitedClaim(list[ClaimedJob]):
    """What a limited claim took: its jobs in start order (a list, as any claim's), and
    ``concurrency_keys``: the (task, concurrency key) of each one that has a key, the key
    buckets to charge."""

    concurrency_keys: list[tuple[str, str]]


def claimed_with_keys(rows: Rows) -> LimitedClaim:
    """Rows of the limited claim: a ``ClaimedJob``'s columns, then its ``concurrency_key``."""
    n = len(ClaimedJob._fields)
    claimed = LimitedClaim(claimed_in_order([row[:n] for row in rows]))
    claimed.concurrency_keys = [(row[2], row[n]) for row in rows if row[n] is not None]
    return claimed


def claim_limited(
    s: Statements,
    worker_id: str,
    queues: Sequence[str] | None,
    limit: int,
    allow: Mapping[str, int],
    keycaps: Mapping[str, int],
    answer: Answer | None = None,
    keyrates: Mapping[str, int] | None = None,
) -> Query[LimitedClaim]:
    """``keyrates``: task → the starts a key of it with no bucket allows at once."""
    keyrates = keyrates or {}
    params: dict[str, Any] = {
        "me": worker_id,
        "limit": limit,
        "scan": min(1000, limit * 4),
        "allow_keys": list(allow),
        "allow_n": list(allow.values()),
        "keycap_tasks": list(keycaps),
        "keycap_n": list(keycaps.values()),
        "keyrate_tasks": list(keyrates),
        "keyrate_n": list(keyrates.values()),
    }
    if queues:
        params["queues"] = list(queues)
    _answer_params(params, limit, answer)
    statement = s.claim_limited(queues, answering=answer is not None)
    return Query(statement, params, claimed_with_keys)


def limits_lock(s: Statements) -> Query[None]:
    return Query(s.limits_lock, {}, _no_value)


def jobs_statistics(s: Statements) -> Query[tuple[int, float, float | None] | None]:
    def mapper(rows: Rows) -> tuple[int, float, float | None] | None:
        return (int(rows[0][0]), float(rows[0][1]), rows[0][2]) if rows else None

    return Query(s.jobs_statistics, {}, mapper)


def analyze_lock(s: Statements) -> Query[bool]:
    return Query(s.analyze_lock, {}, lambda rows: bool(rows[0][0]))


def analyze_wait(s: Statements) -> Query[None]:
    return Query(s.analyze_wait, {}, _no_value)


def analyze_jobs(s: Statements) -> Query[None]:
    return Query(s.analyze_jobs, {}, _no_value)


def running_counts(
    s: Statements, tasks: Sequence[str], queues: Sequence[str]
) -> Query[dict[str, int]]:
    return Query(
        s.running_counts,
        {"tasks": list(tasks), "queue_names": list(queues)},
        lambda rows: {row[0]: row[1] for row in rows},
    )


def read_buckets(s: Statements, keys: Sequence[str]) -> Query[dict[str, tuple[float, float]]]:
    return Query(
        s.read_buckets,
        {"keys": list(keys)},
        lambda rows: {row[0]: (float(row[1]), float(row[2])) for row in rows},
    )


def read_key_buckets(s: Statements, tasks: Sequence[str]) -> Query[dict[str, tuple[float, float]]]:
    """Every key bucket of these tasks (``key_rate_limit``), as :func:`read_buckets`."""
    patterns = [_like_literal(f"key:{task}#") + "%" for task in tasks]
    return Query(
        s.read_key_buckets,
        {"key_patterns": patterns},
        lambda rows: {row[0]: (float(row[1]), float(row[2])) for row in rows},
    )


def delete_buckets(s: Statements, keys: Sequence[str]) -> Query[None]:
    return Query(s.delete_buckets, {"full_keys": list(keys)}, _no_value)


def write_buckets(s: Statements, tokens: Mapping[str, float]) -> Query[None]:
    params = {"keys": list(tokens), "bucket_tokens": list(tokens.values())}
    return Query(s.write_buckets, params, _no_value)


def queue_limits(s: Statements) -> Query[dict[str, tuple[int | None, float | None]]]:
    return Query(s.queue_limits, {}, lambda rows: {row[0]: (row[1], row[2]) for row in rows})


def clear_old_results(s: Statements, older_than: float) -> Query[int]:
    return Query(s.clear_old_results, {"older_than": older_than}, _count)


def set_queue_limits(
    s: Statements, name: str, concurrency: int | None, rate_limit: float | None
) -> Query[None]:
    params = {"queue_name": name, "queue_concurrency": concurrency, "queue_rate_limit": rate_limit}
    return Query(s.set_queue_limits, params, _no_value)


def forget_dead_workers(s: Statements, after: float, me: str) -> Query[list[str]]:
    return Query(
        s.forget_dead_workers,
        {"after": after, "me": me},
        lambda rows: [r[0] for r in rows],
        driver=True,
    )


def roster(s: Statements) -> Query[list[tuple[str, list[str] | None]]]:
    """The registered workers (ids, queues): dead ones are gone after each beat's rescue."""
    return Query(s.roster, {}, lambda rows: [(r[0], r[1]) for r in rows])


def orphaned_jobs(s: Statements) -> Query[list[tuple[str, ClaimedJob, int]]]:
    """(old worker id, job, rescues so far) of every running job whose worker is gone."""
    n = len(ClaimedJob._fields)  # then the worker's id and the rescues
    return Query(
        s.orphaned_jobs, {}, lambda rows: [(r[n], to_claimed(r), int(r[n + 1])) for r in rows]
    )


def unregister_worker(s: Statements, worker_id: str) -> Query[int]:
    return Query(s.unregister_worker, {"me": worker_id}, _count)


# == operations (pgtq_0002): list, stats, clean-up, cancel, queues ================================


@dataclass(frozen=True, slots=True)
class SelectionKey:
    """Which filters select the jobs of a statement (their values are parameters; statuses
    are literals, so the partial indexes match). ``before``/``since``: ``"at"`` an instant,
    ``"ago"`` seconds before now."""

    ids: bool = False
    queue: bool = False
    statuses: tuple[Status, ...] | None = None
    task: bool = False
    lock: bool = False
    tags: bool = False
    search: bool = False
    before: Literal["at", "ago"] | None = None
    since: Literal["at", "ago"] | None = None
    workflow: bool = False


@dataclass(frozen=True, slots=True)
class ListKey(SelectionKey):
    """Which filters a ``list_jobs`` statement has: a selection, and its page."""

    after: bool = False
    newest_first: bool = False


@dataclass(frozen=True, slots=True)
class Selection:
    """The checked values of the filters that select jobs (None: not filtered), for a list or
    a bulk control. A new filter is a field here, its flag in :class:`SelectionKey` and its
    clause in ``Statements._selected``."""

    ids: tuple[int, ...] | None = None
    queue: str | None = None
    statuses: tuple[Status, ...] | None = None
    task: str | None = None
    lock: str | None = None
    #: Jobs having every one of these tags (sorted, no duplicate).
    tags: tuple[str, ...] | None = None
    search: str | None = None
    #: Created before this instant, or this many seconds ago.
    before: datetime | float | None = None
    #: Created at or after this instant, or this many seconds ago.
    since: datetime | float | None = None
    #: The jobs of one workflow (``Job.workflow_id``).
    workflow: int | None = None

    @property
    def is_empty(self) -> bool:
        """No filter at all: it selects every job."""
        return not any(self._flags().values())

    def key(self) -> SelectionKey:
        return SelectionKey(**self._flags())

    def _flags(self) -> dict[str, Any]:
        def bound(value: datetime | float | None) -> Literal["at", "ago"] | None:
            return None if value is None else "at" if isinstance(value, datetime) else "ago"

        return {
            "ids": self.ids is not None,
            "queue": self.queue is not None,
            "statuses": tuple(sorted(set(self.statuses))) if self.statuses else None,
            "task": self.task is not None,
            "lock": self.lock is not None,
            "tags": bool(self.tags),
            "search": bool(self.search),
            "before": bound(self.before),
            "since": bound(self.since),
            "workflow": self.workflow is not None,
        }

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.ids is not None:
            params["only_ids"] = list(self.ids)
        for name in ("queue", "task", "lock"):
            value = getattr(self, name)
            if value is not None:
                params["only_" + name] = value
        if self.tags:
            params["only_tags"] = list(self.tags)
        if self.workflow is not None:
            params["only_workflow"] = self.workflow
        if self.search:
            params["search"] = "%" + _like_literal(self.search) + "%"
        for name in ("before", "since"):
            value = getattr(self, name)
            if value is not None:
                suffix = "at" if isinstance(value, datetime) else "ago"
                params[f"{name}_{suffix}"] = value
        return params


def list_jobs(
    s: Statements,
    selection: Selection = Selection(),
    *,
    limit: int = 100,
    after: int | None = None,
    newest_first: bool = False,
) -> Query[list[Job]]:
    """One page of the jobs ``selection`` selects (its ``search`` taken literally: LIKE's
    wildcards in it are escaped)."""
    key = ListKey(**selection._flags(), after=after is not None, newest_first=newest_first)
    params: dict[str, Any] = {**selection.params(), "limit": limit}
    if after is not None:
        params["after"] = after
    return Query(s.list_jobs(key), params, lambda r: [to_job(row) for row in r])


def bulk_jobs(
    s: Statements, action: Action, selection: Selection, preview: bool = False
) -> Query[list[int]]:
    """``action`` on every job ``selection`` selects: the ids it changed, in order
    (``preview``: the ids it would change now, changing nothing)."""
    statement = s.bulk(action, selection.key(), preview)
    return Query(statement, selection.params(), _id_list)


def stats_queries(s: Statements, window: float) -> tuple[Query[Any], ...]:
    """The reads behind ``stats()``, run in one transaction; ``to_stats`` combines them."""
    return (
        Query(s.queue_counts, {}, lambda r: [tuple(row) for row in r]),
        Query(s.finished_counts, {"window": window}, lambda r: [tuple(row) for row in r]),
        Query(s.workers_running, {}, lambda r: list(r)),
        Query(s.queue_rows, {}, lambda r: {row[0]: bool(row[1]) for row in r}),
    )


def to_stats(
    window: float,
    counts: Iterable[tuple[str, str, int, float | None]],
    finished: Iterable[tuple[str, str, int]],
    workers: Rows,
    known: Mapping[str, bool],
) -> Stats:
    """Combine the results of ``stats_queries`` (pure). ``known``: the queues of the
    ``queues`` table, each paused or not; every one is shown, idle ones with zero counts."""
    per_queue: dict[str, dict[Status, int]] = {}
    oldest: dict[str, float] = {}
    for queue, status, n, age in counts:
        per_queue.setdefault(queue, {})[Status(status)] = n
        if age is not None:
            oldest[queue] = max(0.0, age)
    rates = {(queue, task): n / window for queue, task, n in finished if n}
    names = set(per_queue) | set(known) | {queue for queue, _ in rates}
    queues = {}
    for name in sorted(names):
        found = per_queue.get(name, {})
        queue_rates = [r for (q, _), r in rates.items() if q == name]
        queues[name] = QueueStats(
            name=name,
            counts={status: found.get(status, 0) for status in COUNTED_STATUSES},
            oldest_waiting=oldest.get(name),
            rate=sum(queue_rates) if queue_rates else None,
            paused=known.get(name, False),
        )
    return Stats(window=window, queues=queues, rates=rates, workers=_to_workers(workers))


def _to_workers(rows: Rows) -> tuple[WorkerInfo, ...]:
    """Rows of ``workers_running``: a worker's columns, then one job it runs (or NULLs)."""
    workers: dict[str, WorkerInfo] = {}
    running: dict[str, list[RunningJob]] = {}
    for row in rows:
        worker_id = row[0]
        if worker_id not in workers:
            workers[worker_id] = _to_worker(row)
            running[worker_id] = []
        job_id, task_name, queue, started_at = row[7:11]
        if job_id is not None:
            running[worker_id].append(RunningJob(job_id, task_name, queue, started_at))
    return tuple(replace(w, running=tuple(running[w.id])) for w in workers.values())


def _to_worker(row: Row) -> WorkerInfo:
    """The first columns of a row as ``Statements._worker_columns`` gives them."""
    return WorkerInfo(
        id=row[0],
        hostname=row[1],
        pid=row[2],
        queues=tuple(row[3]) if row[3] is not None else None,
        started_at=row[4],
        last_heartbeat=row[5],
        heartbeat_age=max(0.0, row[6]),
    )


def delete_old_jobs(
    s: Statements, older_than: float, statuses: tuple[Status, ...], queue: str | None = None
) -> Query[int]:
    params: dict[str, Any] = {"older_than": older_than}
    if queue is not None:
        params["only_queue"] = queue
    statement = s.delete_old(tuple(sorted(set(statuses))), queue is not None)
    return Query(statement, params, lambda r: int(_one_or_none(r)))


def cancel_job(s: Statements, job_id: int) -> Query[bool]:
    return Query(s.cancel, {"job_id": job_id}, bool)


def pause_queue(s: Statements, name: str) -> Query[bool]:
    return Query(s.pause_queue, {"queue_name": name}, bool)


def resume_queue(s: Statements, name: str) -> Query[bool]:
    return Query(s.resume_queue, {"queue_name": name}, lambda r: bool(_one_or_none(r)))


def declare_queues(s: Statements, names: Sequence[str]) -> Query[list[str]]:
    return Query(s.declare_queues, {"queue_names": list(names)}, lambda r: [row[0] for row in r])


def list_queues(s: Statements) -> Query[list[QueueInfo]]:
    return Query(s.list_queues, {}, lambda r: [QueueInfo(row[0], row[1], row[2]) for row in r])


# == periodic: ticks of periodic tasks (pgtq/periodic.py) ========================================


@dataclass(frozen=True, slots=True)
class TickRows:
    """Parallel arrays of periodic ticks: the jobs they become, and which tick each is."""

    jobs: JobRows
    periodic_id: list[str]
    tick_at: list[datetime]

    @classmethod
    def empty(cls) -> TickRows:
        return cls(JobRows.empty(), [], [])

    def as_params(self) -> dict[str, Any]:
        params = {
            **self.jobs.as_params(),
            new_param("periodic_id"): self.periodic_id,
            new_param("tick_at"): self.tick_at,
        }
        _same_lengths("TickRows", params)
        return params


@dataclass(frozen=True, slots=True)
class DeferredTick:
    """A tick that one ``defer_ticks`` statement deferred (no other ever will)."""

    task_name: str
    periodic_id: str
    tick_at: datetime
    job_id: int


def defer_ticks(s: Statements, rows: TickRows) -> Query[list[DeferredTick]]:
    return Query(s.defer_ticks, rows.as_params(), lambda r: [DeferredTick(*row) for row in r])


def delete_old_ticks(s: Statements, older_than: float) -> Query[int]:
    return Query(s.delete_old_ticks, {"older_than": older_than}, lambda r: int(_one_or_none(r)))


def _schedule(task_name: str, periodic_id: str) -> dict[str, Any]:
    return {"schedule_task": task_name, "schedule_id": periodic_id}


def register_schedules(s: Statements, keys: Sequence[tuple[str, str]]) -> Query[int]:
    params = {"schedule_tasks": [k[0] for k in keys], "schedule_ids": [k[1] for k in keys]}
    return Query(s.register_schedules, params, _count)


def pause_schedule(s: Statements, task_name: str, periodic_id: str) -> Query[bool]:
    return Query(s.pause_schedule, _schedule(task_name, periodic_id), bool)


def resume_schedule(s: Statements, task_name: str, periodic_id: str) -> Query[bool]:
    return Query(s.resume_schedule, _schedule(task_name, periodic_id), bool)


def run_schedule_now(s: Statements, rows: TickRows) -> Query[int]:
    """One tick row: the job ``run_now`` defers (``rows`` of one schedule, one instant)."""
    return Query(s.run_schedule_now, rows.as_params(), lambda r: int(_one_or_none(r)))


def schedule_states(
    s: Statements, keys: Sequence[tuple[str, str]]
) -> Query[dict[tuple[str, str], ScheduleState]]:
    """The state and last tick of each schedule (task name, periodic id) asked for."""

    def mapper(rows: Rows) -> dict[tuple[str, str], ScheduleState]:
        return {(r[0], r[1]): ScheduleState(*r) for r in rows}

    params = {"schedule_tasks": [k[0] for k in keys], "schedule_ids": [k[1] for k in keys]}
    return Query(s.schedule_states, params, mapper)


# == web dashboard (pgtq.web): reads behind its pages ============================================


def _like_literal(text: str) -> str:
    """``text`` matched literally by LIKE/ILIKE with ``ESCAPE '\\'``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def throughput(
    s: Statements, window: float, bucket: float, queue: str | None = None
) -> Query[Throughput]:
    """Jobs that ended per bucket over the window (see :meth:`Statements.throughput`)."""
    params: dict[str, Any] = {"window": window, "bucket": bucket}
    if queue is not None:
        params["queue"] = queue

    def mapper(rows: Rows) -> Throughput:
        return to_throughput(window, bucket, rows)

    return Query(s.throughput(queue is not None), params, mapper)


def to_throughput(window: float, bucket: float, rows: Iterable[Sequence[Any]]) -> Throughput:
    """Rows of ``throughput`` as buckets, oldest first (pure)."""
    counts: dict[int, dict[Status, int]] = {}
    for slot, status, n in rows:
        found = counts.setdefault(int(slot), {})
        if status is not None:
            found[Status(status)] = int(n)
    buckets = tuple(
        ThroughputBucket(start=datetime.fromtimestamp(slot * bucket, UTC), counts=found)
        for slot, found in sorted(counts.items())
    )
    return Throughput(window=window, bucket=bucket, buckets=buckets)


# == health (pgtq healthcheck, /healthz) ===========================================================


def worker_heartbeats(s: Statements) -> Query[list[WorkerInfo]]:
    """Every registered worker with the age of its last heartbeat on the database's clock,
    freshest first (no jobs: the health checks read only ``workers``)."""

    return Query(s.worker_heartbeats, {}, lambda rows: [_to_worker(r) for r in rows])
