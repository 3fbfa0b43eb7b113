"""Every SQL statement pgtq runs, built once with SQLAlchemy Core, and the pure row mappers.

This is the one module where a job's status changes: search for a status name here to find
every transition. Statements are built per schema (``statements_for``) and cached, so
SQLAlchemy's compiled cache and the drivers' prepared statements see the same objects each
time. Nothing here does I/O; a :class:`Query` pairs a statement with its parameters and the
pure function that turns its result into a value, and either connector runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache, cached_property
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Result
from sqlalchemy.sql import Executable

from pgtq.model import ClaimedJob, Job, Status
from pgtq.schema import Tables, notify_channel, tables_for

T = TypeVar("T")


def _status(status: Status) -> sa.ColumnElement[str]:
    # Rendered as a literal, never a parameter: the planner must see ``status = 'todo'`` to
    # use the partial indexes, also in a prepared statement's generic plan.
    return sa.literal_column(f"'{status.value}'", sa.Text)


TODO, DOING = _status(Status.TODO), _status(Status.DOING)
SUCCEEDED, FAILED = _status(Status.SUCCEEDED), _status(Status.FAILED)
CANCELLED, ABORTED = _status(Status.CANCELLED), _status(Status.ABORTED)
ONE_SECOND: sa.ColumnElement[Any] = sa.literal_column("interval '1 second'")


@dataclass(frozen=True, slots=True)
class Query(Generic[T]):
    """A statement, its parameters and the pure mapping of its result: what a twin runs.

    The mapper gets a SQLAlchemy ``Result``, or on the worker's fast path a list of driver
    records: mappers of hot-path queries only iterate rows and index them by position.
    """

    statement: Executable
    params: dict[str, Any]
    mapper: Callable[[Any], T]


def _array(name: str, item: sa.types.TypeEngine[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=ARRAY(item))


def _id_list(result: Iterable[Sequence[Any]]) -> list[int]:
    return sorted(row[0] for row in result)


def _one_or_none(result: Result[Any]) -> Any:
    row = result.first()
    return None if row is None else row[0]


def _rowcount(result: Result[Any]) -> int:
    return len(result.all())


class Statements:
    """The statements of one schema. Built lazily, once per schema."""

    def __init__(self, tables: Tables) -> None:
        self.t = tables
        self.jobs = tables.jobs
        self.channel = notify_channel(tables.schema)
        self.abort_channel = self.channel + "_abort"

    # -- enqueue ---------------------------------------------------------------------------

    @cached_property
    def insert_jobs(self) -> sa.Insert:
        """Insert many jobs from parallel arrays in one statement (the insert trigger notifies)."""
        j = self.jobs
        rows = (
            sa.func.unnest(
                _array("queue", sa.Text()),
                _array("task_name", sa.Text()),
                _array("args", sa.Text()),
                _array("priority", sa.Integer()),
                _array("scheduled_at", sa.DateTime(timezone=True)),
                _array("lock", sa.Text()),
                _array("queueing_lock", sa.Text()),
            )
            .table_valued(
                sa.column("queue", sa.Text),
                sa.column("task_name", sa.Text),
                sa.column("args", sa.Text),
                sa.column("priority", sa.Integer),
                sa.column("scheduled_at", sa.DateTime(timezone=True)),
                sa.column("lock", sa.Text),
                sa.column("queueing_lock", sa.Text),
            )
            .render_derived("new_jobs")
        )
        select = sa.select(
            rows.c.queue,
            rows.c.task_name,
            sa.cast(rows.c.args, JSONB),
            rows.c.priority,
            rows.c.scheduled_at,
            rows.c.lock,
            rows.c.queueing_lock,
        )
        columns = [
            "queue",
            "task_name",
            "args",
            "priority",
            "scheduled_at",
            "lock",
            "queueing_lock",
        ]
        return sa.insert(j).from_select(columns, select).returning(j.c.id)

    # -- claim -----------------------------------------------------------------------------

    def claim(self, queues: Sequence[str] | None) -> sa.Select[Any]:
        if not queues:
            return self._claim_all
        return self._claim_one if len(queues) == 1 else self._claim_some

    def _claim_statement(self, *, queues: str) -> sa.Select[Any]:
        """Claim up to ``:limit`` due jobs in priority order, in one statement.

        ``todo → doing``. SKIP LOCKED lets workers claim side by side; a job whose ``lock``
        has a running job is passed over, and of several jobs sharing a lock only the first
        is taken. Two workers racing for one lock are stopped by the unique index on running
        locks (the loser retries its claim).
        """
        j = self.jobs
        running = j.alias("running")
        lock_free = sa.or_(
            j.c.lock.is_(None),
            ~sa.exists().where(running.c.lock == j.c.lock, running.c.status == DOING),
        )
        due = sa.or_(j.c.scheduled_at.is_(None), j.c.scheduled_at <= sa.func.now())
        where = [j.c.status == TODO, due, lock_free]
        if queues == "one":  # equality, so the (queue, priority, id) index gives the order
            where.append(j.c.queue == sa.bindparam("queue", type_=sa.Text))
        elif queues == "some":
            where.append(j.c.queue == sa.any_(_array("queues", sa.Text())))
        candidates = (
            sa.select(j.c.id, j.c.lock, j.c.priority)
            .where(*where)
            .order_by(j.c.priority.desc(), j.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
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
        claimed = (
            sa.update(j)
            .where(j.c.id == picked.c.id)
            .values(
                status=DOING,
                attempts=j.c.attempts + 1,
                worker_id=sa.bindparam("worker_id", type_=sa.Text),
                started_at=sa.func.now(),
            )
            .returning(
                j.c.id, j.c.queue, j.c.task_name, j.c.args, j.c.attempts, j.c.priority, j.c.lock
            )
            .cte("claimed")
        )
        return sa.select(claimed).order_by(claimed.c.priority.desc(), claimed.c.id)

    @cached_property
    def _claim_all(self) -> sa.Select[Any]:
        return self._claim_statement(queues="all")

    @cached_property
    def _claim_one(self) -> sa.Select[Any]:
        return self._claim_statement(queues="one")

    @cached_property
    def _claim_some(self) -> sa.Select[Any]:
        return self._claim_statement(queues="some")

    @cached_property
    def release(self) -> sa.Update:
        """Give back claimed jobs that never started: ``doing → todo``, attempt undone."""
        j = self.jobs
        return (
            sa.update(j)
            .where(
                j.c.id == sa.any_(_array("ids", sa.BigInteger())),
                j.c.status == DOING,
                j.c.worker_id == sa.bindparam("worker_id", type_=sa.Text),
            )
            .values(
                status=TODO, attempts=j.c.attempts - 1, worker_id=sa.null(), started_at=sa.null()
            )
            .returning(j.c.id)
        )

    # -- complete --------------------------------------------------------------------------

    @cached_property
    def complete(self) -> sa.Update:
        """Write a batch of outcomes in one statement.

        ``doing → succeeded | failed | aborted``, or ``doing → todo`` for a retry (``retry_in``
        seconds from now). Guarded by ``status = 'doing' AND worker_id = :worker_id``: a job
        that was rescued or re-queued meanwhile is never overwritten.
        """
        j = self.jobs
        u = (
            sa.func.unnest(
                _array("ids", sa.BigInteger()),
                _array("statuses", sa.Text()),
                _array("results", sa.Text()),
                _array("errors", sa.Text()),
                _array("retry_in", sa.Float()),
            )
            .table_valued(
                sa.column("id", sa.BigInteger),
                sa.column("status", sa.Text),
                sa.column("result", sa.Text),
                sa.column("error", sa.Text),
                sa.column("retry_in", sa.Float),
            )
            .render_derived("outcomes")
        )
        retrying = u.c.status == TODO
        return (
            sa.update(j)
            .where(
                j.c.id == u.c.id,
                j.c.status == DOING,
                j.c.worker_id == sa.bindparam("worker_id", type_=sa.Text),
            )
            .values(
                status=u.c.status,
                result=sa.cast(u.c.result, JSONB),
                error=sa.cast(u.c.error, JSONB),
                abort_requested=sa.false(),
                worker_id=sa.case((retrying, sa.null()), else_=j.c.worker_id),
                scheduled_at=sa.case(
                    (retrying, sa.func.now() + u.c.retry_in * ONE_SECOND),
                    else_=j.c.scheduled_at,
                ),
                finished_at=sa.case((retrying, sa.null()), else_=sa.func.now()),
            )
            .returning(j.c.id)
        )

    # -- control ---------------------------------------------------------------------------

    def _notify_each(
        self,
        changed: sa.CTE,
        channel: str,
        payload: sa.ColumnElement[Any],
        when: sa.ColumnElement[bool],
    ) -> sa.Select[Any]:
        """Select the changed rows, sending one NOTIFY per row that matches ``when``."""
        sent = (
            sa.select(sa.func.count(sa.func.pg_notify(channel, payload)).label("sent"))
            .select_from(changed)
            .where(when)
            .cte("sent")
        )
        return sa.select(changed.c.id, changed.c.status, changed.c.queue).select_from(
            changed.join(sent, sa.true())
        )

    @cached_property
    def abort(self) -> sa.Select[Any]:
        """``todo → cancelled`` at once; a ``doing`` job gets ``abort_requested`` and a NOTIFY."""
        j = self.jobs
        was_todo = j.c.status == TODO
        changed = (
            sa.update(j)
            .where(
                j.c.id == sa.bindparam("job_id", type_=sa.BigInteger),
                sa.or_(j.c.status == TODO, j.c.status == DOING),
            )
            .values(
                status=sa.case((was_todo, CANCELLED), else_=j.c.status),
                abort_requested=sa.case((was_todo, j.c.abort_requested), else_=sa.true()),
                finished_at=sa.case((was_todo, sa.func.now()), else_=j.c.finished_at),
            )
            .returning(j.c.id, j.c.status, j.c.queue, j.c.worker_id)
            .cte("changed")
        )
        return self._notify_each(
            changed, self.abort_channel, sa.cast(changed.c.id, sa.Text), changed.c.status == DOING
        )

    @cached_property
    def retry(self) -> sa.Select[Any]:
        """``failed | aborted | cancelled → todo``, due now, with a NOTIFY to wake a worker."""
        j = self.jobs
        changed = (
            sa.update(j)
            .where(
                j.c.id == sa.bindparam("job_id", type_=sa.BigInteger),
                sa.or_(j.c.status == FAILED, j.c.status == ABORTED, j.c.status == CANCELLED),
            )
            .values(
                status=TODO,
                scheduled_at=sa.null(),
                worker_id=sa.null(),
                abort_requested=sa.false(),
                started_at=sa.null(),
                finished_at=sa.null(),
            )
            .returning(j.c.id, j.c.status, j.c.queue)
            .cte("changed")
        )
        return self._notify_each(changed, self.channel, changed.c.queue, sa.true())

    @cached_property
    def abort_requested(self) -> sa.Select[Any]:
        j = self.jobs
        return sa.select(j.c.id).where(
            j.c.worker_id == sa.bindparam("worker_id", type_=sa.Text),
            j.c.status == DOING,
            j.c.abort_requested,
        )

    # -- read ------------------------------------------------------------------------------

    @cached_property
    def get(self) -> sa.Select[Any]:
        return sa.select(self.jobs).where(
            self.jobs.c.id == sa.bindparam("job_id", type_=sa.BigInteger)
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
    def register_worker(self) -> sa.Insert:
        w = self.t.workers
        return sa.insert(w).values(
            id=sa.bindparam("worker_id"),
            hostname=sa.bindparam("hostname"),
            pid=sa.bindparam("pid"),
            queues=sa.bindparam("queues", type_=ARRAY(sa.Text)),
        )

    @cached_property
    def heartbeat(self) -> sa.Update:
        w = self.t.workers
        return (
            sa.update(w)
            .where(w.c.id == sa.bindparam("worker_id", type_=sa.Text))
            .values(last_heartbeat=sa.func.now())
        )

    @cached_property
    def unregister_worker(self) -> sa.Delete:
        w = self.t.workers
        return sa.delete(w).where(w.c.id == sa.bindparam("worker_id", type_=sa.Text))


@cache
def statements_for(schema: str) -> Statements:
    return Statements(tables_for(schema))


# -- row mappers (pure) ------------------------------------------------------------------------


def to_job(row: Any) -> Job:
    m = row._mapping
    return Job(
        id=m["id"],
        queue=m["queue"],
        task_name=m["task_name"],
        args=m["args"],
        status=Status(m["status"]),
        priority=m["priority"],
        scheduled_at=m["scheduled_at"],
        lock=m["lock"],
        queueing_lock=m["queueing_lock"],
        attempts=m["attempts"],
        worker_id=m["worker_id"],
        abort_requested=m["abort_requested"],
        result=m["result"],
        error=m["error"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def to_claimed(row: Any) -> ClaimedJob:
    return ClaimedJob(row[0], row[1], row[2], row[3], row[4], row[5], row[6])


# -- queries: statement + parameters + mapper, run by either connector ------------------------


@dataclass(frozen=True, slots=True)
class JobRows:
    """Parallel arrays of encoded jobs: the parameters of ``insert_jobs``."""

    queue: list[str]
    task_name: list[str]
    args: list[str]
    priority: list[int]
    scheduled_at: list[datetime | None]
    lock: list[str | None]
    queueing_lock: list[str | None]

    def as_params(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "task_name": self.task_name,
            "args": self.args,
            "priority": self.priority,
            "scheduled_at": self.scheduled_at,
            "lock": self.lock,
            "queueing_lock": self.queueing_lock,
        }


def insert_jobs(s: Statements, rows: JobRows) -> Query[list[int]]:
    return Query(s.insert_jobs, rows.as_params(), _id_list)


def get_job(s: Statements, job_id: int) -> Query[Job | None]:
    def mapper(result: Result[Any]) -> Job | None:
        row = result.first()
        return None if row is None else to_job(row)

    return Query(s.get, {"job_id": job_id}, mapper)


def claim_jobs(
    s: Statements, worker_id: str, queues: Sequence[str] | None, limit: int
) -> Query[list[ClaimedJob]]:
    params: dict[str, Any] = {"worker_id": worker_id, "limit": limit}
    if queues and len(queues) == 1:
        params["queue"] = queues[0]
    elif queues:
        params["queues"] = list(queues)
    return Query(s.claim(queues), params, lambda r: [to_claimed(row) for row in r])


@dataclass(slots=True)
class Outcomes:
    """Finished attempts waiting to be written, as parallel arrays (one ``complete`` each)."""

    ids: list[int]
    statuses: list[str]
    results: list[str | None]
    errors: list[str | None]
    retry_in: list[float | None]

    @classmethod
    def empty(cls) -> Outcomes:
        return cls([], [], [], [], [])

    def add(
        self,
        job_id: int,
        status: Status,
        result: str | None = None,
        error: str | None = None,
        retry_in: float | None = None,
    ) -> None:
        self.ids.append(job_id)
        self.statuses.append(status.value)
        self.results.append(result)
        self.errors.append(error)
        self.retry_in.append(retry_in)

    def __len__(self) -> int:
        return len(self.ids)


def complete_jobs(s: Statements, worker_id: str, outcomes: Outcomes) -> Query[list[int]]:
    params = {
        "worker_id": worker_id,
        "ids": outcomes.ids,
        "statuses": outcomes.statuses,
        "results": outcomes.results,
        "errors": outcomes.errors,
        "retry_in": outcomes.retry_in,
    }
    return Query(s.complete, params, _id_list)


def release_jobs(s: Statements, worker_id: str, ids: Sequence[int]) -> Query[list[int]]:
    return Query(s.release, {"worker_id": worker_id, "ids": list(ids)}, _id_list)


def abort_job(s: Statements, job_id: int) -> Query[Status | None]:
    """The job's status after the request (``cancelled`` or ``doing``), None if already final."""

    def mapper(result: Result[Any]) -> Status | None:
        row = result.first()
        return None if row is None else Status(row.status)

    return Query(s.abort, {"job_id": job_id}, mapper)


def retry_job(s: Statements, job_id: int) -> Query[bool]:
    return Query(s.retry, {"job_id": job_id}, lambda r: r.first() is not None)


def abort_requested_ids(s: Statements, worker_id: str) -> Query[list[int]]:
    return Query(s.abort_requested, {"worker_id": worker_id}, _id_list)


def is_migrated(s: Statements) -> Query[bool]:
    return Query(s.migrated, {}, lambda r: bool(_one_or_none(r)))


def status_counts(s: Statements) -> Query[dict[tuple[str, Status], int]]:
    def mapper(result: Result[Any]) -> dict[tuple[str, Status], int]:
        rows = [cast(tuple[str, str, int], tuple(row)) for row in result]
        return {(queue, Status(status)): count for queue, status, count in rows}

    return Query(s.status_counts, {}, mapper)


def status_counts_of(s: Statements, ids: Sequence[int]) -> Query[dict[Status, tuple[int, int]]]:
    def mapper(result: Iterable[Sequence[Any]]) -> dict[Status, tuple[int, int]]:
        return {Status(row[0]): (row[1], row[2]) for row in result}

    return Query(s.status_counts_of, {"ids": list(ids)}, mapper)


def register_worker(
    s: Statements, worker_id: str, hostname: str, pid: int, queues: Sequence[str] | None
) -> Query[int]:
    params = {
        "worker_id": worker_id,
        "hostname": hostname,
        "pid": pid,
        "queues": list(queues) if queues else None,
    }
    return Query(s.register_worker, params, lambda r: r.rowcount)


def heartbeat(s: Statements, worker_id: str) -> Query[int]:
    return Query(s.heartbeat, {"worker_id": worker_id}, lambda r: r.rowcount)


def unregister_worker(s: Statements, worker_id: str) -> Query[int]:
    return Query(s.unregister_worker, {"worker_id": worker_id}, lambda r: r.rowcount)
