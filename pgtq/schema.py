"""The tables, defined once.

This module is the truth the Alembic revisions in ``alembic/versions/`` must match (a drift
test compares them). Tables live in their own PostgreSQL schema, so the definitions are built
per schema name by :func:`tables_for`; ``metadata`` holds them for the default schema.

It imports nothing of pgtq's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

DEFAULT_SCHEMA = "pgtq"

#: Every status a job can have. A status changes only in ``pgtq/statements.py``.
#: ``blocked`` (pgtq_0011): waiting for the jobs it depends on (``configure(depends_on=...)``).
STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborted", "blocked")

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class InvalidSchemaName(ValueError):
    """The schema name is not a plain lower-case PostgreSQL identifier."""


#: The predicates of the keys' partial unique indexes (an ON CONFLICT names them to find its
#: arbiter index): a waiting job holds its ``queueing_lock``; a job of a period holds its
#: ``unique_key`` unless it failed or ended early.
QUEUEING_LOCK_HELD = "status = 'todo' AND queueing_lock IS NOT NULL"
UNIQUE_KEY_HELD = "unique_key IS NOT NULL AND status NOT IN ('failed', 'cancelled', 'aborted')"


def validate_schema_name(name: str) -> str:
    """Accept only plain identifiers, so the name is safe in DDL, channel names and URLs."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or name.startswith("pg_"):
        raise InvalidSchemaName(
            f"invalid schema name {name!r}: use a lower-case PostgreSQL identifier "
            "(letters, digits and '_', at most 63 characters, not starting with 'pg_')"
        )
    return name


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel that announces new jobs (payload: the queue name)."""
    return f"pgtq_{schema}"


@dataclass(frozen=True)
class Tables:
    schema: str
    metadata: sa.MetaData
    jobs: sa.Table
    workers: sa.Table
    queues: sa.Table
    job_events: sa.Table
    job_history: sa.TableClause
    periodic_ticks: sa.Table
    periodic_schedules: sa.Table
    limit_buckets: sa.Table
    job_dependencies: sa.Table
    watchers: sa.Table


@cache
def tables_for(schema: str = DEFAULT_SCHEMA) -> Tables:
    validate_schema_name(schema)
    metadata = sa.MetaData(schema=schema)
    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    jobs = sa.Table(
        "jobs",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("queue", sa.Text, nullable=False, server_default="default"),
        sa.Column("task_name", sa.Text, nullable=False),
        sa.Column("args", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("status", sa.Text, nullable=False, server_default="todo"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lock", sa.Text, nullable=True),
        sa.Column("queueing_lock", sa.Text, nullable=True),
        # ``<queueing_lock>@<period number>`` of a job deferred with ``unique_for``.
        sa.Column("unique_key", sa.Text, nullable=True),
        # pgtq_0004: jobs sharing a key run at most ``cap`` at a time (a lock is cap 1).
        sa.Column("concurrency_key", sa.Text, nullable=True),
        # pgtq_0004: the deferring span's trace context (W3C traceparent), when tracing is on.
        sa.Column("trace_context", JSONB, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        # Times the job was snoozed (``raise pgtq.Snooze``): its attempts were given back.
        sa.Column("snoozes", sa.Integer, nullable=False, server_default="0"),
        sa.Column("worker_id", sa.Text, nullable=True),
        sa.Column("abort_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("result", JSONB, nullable=True),
        sa.Column("error", JSONB, nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        # pgtq_0009: ``configure(tags=..., meta=...)``, for people and filters only.
        sa.Column("tags", sa.ARRAY(sa.Text), nullable=True),
        sa.Column("meta", JSONB, nullable=True),
        # pgtq_0009: ``{"fraction": ..., "message": ...}``, the last ``ctx.set_progress``.
        sa.Column("progress", JSONB, nullable=True),
        # pgtq_0009: this job's own timeout (seconds) and attempt budget; NULL: the task's.
        sa.Column("timeout", sa.Float, nullable=True),
        sa.Column("max_attempts", sa.Integer, nullable=True),
        # pgtq_0011, workflows: on a child, its parents not settled yet (blocked until 0); on
        # a parent, the edges naming it (NULL on every other job: the completion statement
        # of jobs without children refuses a row where it is set); the workflow it is of.
        sa.Column("pending_parents", sa.Integer, nullable=True),
        sa.Column("children", sa.Integer, nullable=True),
        sa.Column("workflow_id", sa.BigInteger, nullable=True),
        # pgtq_0011: on a batch's callback, how many of its parents ended badly so far.
        sa.Column("failed_parents", sa.Integer, nullable=True),
        sa.CheckConstraint(f"status IN ({statuses})", name="jobs_status_check"),
        # The claim indexes hold only waiting jobs: they stay small however many finished
        # jobs the table keeps, and give the claim its order without a sort. One serves a
        # worker of every queue (or several), the other a worker of one queue.
        sa.Index(
            "jobs_claim_idx",
            sa.text("priority DESC"),
            "id",
            postgresql_where=sa.text("status = 'todo'"),
        ),
        sa.Index(
            "jobs_queue_claim_idx",
            "queue",
            sa.text("priority DESC"),
            "id",
            postgresql_where=sa.text("status = 'todo'"),
        ),
        # At most one running job per lock, enforced by the database itself.
        sa.Index(
            "jobs_lock_doing_idx",
            "lock",
            unique=True,
            postgresql_where=sa.text("status = 'doing' AND lock IS NOT NULL"),
        ),
        # At most one waiting job per queueing lock.
        sa.Index(
            "jobs_queueing_lock_todo_idx",
            "queueing_lock",
            unique=True,
            postgresql_where=sa.text(QUEUEING_LOCK_HELD),
        ),
        # At most one job per key and period (``unique_for``) that did not fail or end early.
        sa.Index(
            "jobs_unique_key_idx",
            "unique_key",
            unique=True,
            postgresql_where=sa.text(UNIQUE_KEY_HELD),
        ),
        # The jobs a worker holds: abort polling and rescue look them up.
        sa.Index(
            "jobs_worker_doing_idx",
            "worker_id",
            postgresql_where=sa.text("status = 'doing'"),
        ),
        # The tag filters (``tags @> ...``); untagged jobs stay out of it.
        sa.Index(
            "jobs_tags_idx",
            "tags",
            postgresql_using="gin",
            postgresql_where=sa.text("tags IS NOT NULL"),
        ),
    )
    # -- workflows (pgtq_0011): one row per dependency edge -----------------------------------
    # The primary key leads with the parent: a finishing parent finds its children by index;
    # the second index finds a child's parents (``ctx.parent_results``, ``jobs show``).
    job_dependencies = sa.Table(
        "job_dependencies",
        metadata,
        sa.Column("parent_id", sa.BigInteger, primary_key=True),
        sa.Column("child_id", sa.BigInteger, primary_key=True),
        # What the child does when this parent ends failed, cancelled or aborted.
        sa.Column("on_parent_failure", sa.Text, nullable=False, server_default="cancel"),
        sa.CheckConstraint(
            "on_parent_failure IN ('cancel', 'run', 'hold', 'failure')",
            name="job_dependencies_on_parent_failure_check",
        ),
        sa.Index("job_dependencies_child_idx", "child_id"),
    )
    # Blocked jobs (waiting for their parents), per queue: the controls and lists that take
    # blocked jobs (cancel, abort, ``status="blocked"``) read them here, never the table. A
    # job without dependencies is never in it.
    sa.Index(
        "jobs_blocked_idx",
        jobs.c.queue,
        postgresql_where=sa.text("status = 'blocked'"),
    )
    sa.Index(
        "jobs_workflow_idx",
        jobs.c.workflow_id,
        postgresql_where=sa.text("workflow_id IS NOT NULL"),
    )
    workers = sa.Table(
        "workers",
        metadata,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("hostname", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.ARRAY(sa.Text), nullable=True),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "last_heartbeat",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
    )
    # -- operations (pgtq_0002): paused queues, and the indexes behind stats and clean-up --
    queues = sa.Table(
        "queues",
        metadata,
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        # pgtq_0004: fleet-wide limits of the queue, enforced in the claim.
        sa.Column("concurrency", sa.Integer, nullable=True),
        sa.Column("rate_limit", sa.Float, nullable=True),  # jobs started per second
    )
    # Finished jobs by end time: the rate over the last minute and ``delete_old_jobs`` read a
    # range of it. Partial, so inserting and claiming jobs (finished_at NULL) never touch it.
    sa.Index(
        "jobs_finished_at_idx",
        jobs.c.finished_at,
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    # Jobs that ended badly, per queue: counted by ``stats`` and listed by ``jobs list`` without
    # a scan of the succeeded ones. Written only when a job ends so, never on the hot path.
    sa.Index(
        "jobs_unsuccessful_idx",
        jobs.c.queue,
        jobs.c.status,
        postgresql_where=sa.text("status IN ('failed', 'aborted', 'cancelled')"),
    )
    # -- control (pgtq_0004): periodic ticks, rate-limit buckets, running jobs per key --------
    sa.Index(
        "jobs_key_doing_idx",
        jobs.c.concurrency_key,
        postgresql_where=sa.text("status = 'doing' AND concurrency_key IS NOT NULL"),
    )
    # One row per (periodic task, tick): the primary key makes each tick deferred once,
    # however many workers run the scheduler.
    periodic_ticks = sa.Table(
        "periodic_ticks",
        metadata,
        sa.Column("task_name", sa.Text, primary_key=True),
        sa.Column("periodic_id", sa.Text, primary_key=True, server_default=""),
        sa.Column("tick_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("job_id", sa.BigInteger, nullable=True),
    )
    # -- periodic control (pgtq_0007): what operators decide about a schedule at run time -----
    # One row per schedule (keyed like ``periodic_ticks``), read by every scheduler in the
    # statement that defers the ticks. ``resumed_at``: ticks before it are never deferred
    # (a resumed schedule does not backfill). ``run_now_*``: the last ``run_now``, whose job
    # is no tick (it takes no ``periodic_ticks`` row, so it never hides a scheduled tick).
    periodic_schedules = sa.Table(
        "periodic_schedules",
        metadata,
        sa.Column("task_name", sa.Text, primary_key=True),
        sa.Column("periodic_id", sa.Text, primary_key=True, server_default=""),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_now_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_now_job_id", sa.BigInteger, nullable=True),
    )
    # Token buckets of the rate limits (``queue:<name>`` or ``task:<name>``).
    limit_buckets = sa.Table(
        "limit_buckets",
        metadata,
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("tokens", sa.Float, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    # -- waiters (pgtq_0012): who listens for the jobs that end ----------------------------------
    # One row per app side's LISTEN of the done channel (pgtq/watcher.py), kept alive while it
    # listens: the statements that end jobs send that channel's NOTIFY only while a row is
    # live, so a burn-down nobody waits for sends none. Unlogged: a crash forgets who listened,
    # and the watchers write their rows again within ``WATCHER_REFRESH``.
    watchers = sa.Table(
        "watchers",
        metadata,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        prefixes=["UNLOGGED"],
    )
    # -- history (pgtq_0003, pgtq_0005): what a job's row is about to forget --------------------
    # A trigger stores an attempt's start and end when the job goes back to ``todo``; the
    # current attempt is read off the row itself (the ``job_history`` view below merges both).
    job_events = sa.Table(
        "job_events",
        metadata,
        sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
        sa.Column("job_id", sa.BigInteger, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        # The clock when the change was written (not the transaction's start): a claim that
        # waited for a lock is recorded after what it waited for.
        sa.Column(
            "at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.clock_timestamp(),
        ),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("worker_id", sa.Text, nullable=True),
        sa.Column("error", JSONB, nullable=True),
        sa.Index("job_events_job_idx", "job_id", "id"),
    )
    # A view (pgtq_0005), so not in ``metadata``: Alembic must not try to create it as a table.
    # ``rank`` orders events of the same instant (deferred, started, the rest); ``seq`` the
    # stored ones among themselves.
    job_history = sa.table(
        "job_history",
        sa.column("job_id", sa.BigInteger),
        sa.column("type", sa.Text),
        sa.column("at", sa.DateTime(timezone=True)),
        sa.column("attempt", sa.Integer),
        sa.column("worker_id", sa.Text),
        sa.column("error", JSONB),
        sa.column("rank", sa.Integer),
        sa.column("seq", sa.BigInteger),
        schema=schema,
    )
    return Tables(
        schema=schema,
        metadata=metadata,
        jobs=jobs,
        workers=workers,
        queues=queues,
        job_events=job_events,
        job_history=job_history,
        periodic_ticks=periodic_ticks,
        periodic_schedules=periodic_schedules,
        limit_buckets=limit_buckets,
        job_dependencies=job_dependencies,
        watchers=watchers,
    )


#: The default schema's tables, for Alembic's ``target_metadata`` in a user's project.
metadata = tables_for(DEFAULT_SCHEMA).metadata

#: The trigger that writes ``job_events``: ``app.jobs.set_history(False)`` disables it (then
#: only the current attempt, read off the job's row, is left in a job's history).
HISTORY_TRIGGERS = ("jobs_history_updated",)
