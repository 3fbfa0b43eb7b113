"""``pgtq.contrib.django.PgtqBackend``: pgtq as a backend of Django's Tasks framework.

::

    TASKS = {"default": {"BACKEND": "pgtq.contrib.django.PgtqBackend", "QUEUES": []}}

A Django task enqueued here is a pgtq job named by the task's module path, its arguments
stored as ``{"args": [...], "kwargs": {...}}``, its ``priority`` (-100..100) pgtq's priority
as it is (both run the higher first), its ``queue_name`` the job's queue, its ``run_after``
the job's ``schedule_at``. The insert runs on Django's connection of the app's database, so
inside ``transaction.atomic()`` the job commits or rolls back with the view's rows. A result
id is the job's id (as a string); ``get_result`` reads the job and its history.

``OPTIONS``: ``{"DATABASE": "alias"}`` (default: ``PGTQ["DATABASE"]``, else ``"default"``).
"""

from __future__ import annotations

from typing import Any

from django.db import connections
from django.utils import timezone
from django.utils.module_loading import import_string

from pgtq.contrib.django import compat
from pgtq.contrib.django.integration import DjangoApp, get_app
from pgtq.model import Job, JobEvent, Status

#: How pgtq's statuses read in Django's: a job that will not run again failed.
STATUSES = {
    Status.TODO: "READY",
    Status.DOING: "RUNNING",
    Status.SUCCEEDED: "SUCCESSFUL",
    Status.FAILED: "FAILED",
    Status.ABORTED: "FAILED",
    Status.CANCELLED: "FAILED",
}

_MIN_PRIORITY, _MAX_PRIORITY = -100, 100


class PgtqBackend(compat.BaseTaskBackend):
    """Django's task backend on pgtq (see the module's documentation)."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.database: str | None = self.options.get("DATABASE")

    @property
    def app(self) -> DjangoApp:
        """The pgtq app this backend defers with (made once from ``settings.PGTQ``)."""
        return get_app(self.database)

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Store one job, in the current transaction of Django's connection (if any)."""
        self.validate_task(task)
        args = compat.normalize_json(list(args))
        kwargs = compat.normalize_json(dict(kwargs))
        app = self.app
        run_after = task.run_after
        if run_after is not None and timezone.is_naive(run_after):
            run_after = timezone.make_aware(run_after)
        deferrer = app.task_for(task).configure(
            queue=task.queue_name, priority=task.priority, schedule_at=run_after
        )
        job_id = deferrer.defer(
            args=args,
            kwargs=kwargs,
            connection=connections[app.database],
        )
        result = compat.TaskResult(
            task=task,
            id=str(job_id),
            status=compat.TaskResultStatus.READY,
            enqueued_at=timezone.now(),
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=args,
            kwargs=kwargs,
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        compat.task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """The task's result as pgtq's tables have it now (committed rows only)."""
        job_id = _job_id(result_id)
        jobs = self.app.jobs
        job = jobs.get(job_id)
        if job is None:
            raise compat.TaskResultDoesNotExist(result_id)
        history = jobs.history(job_id) if job.attempts else []
        return self.result_of(job, history)

    async def aget_result(self, result_id: str) -> Any:
        """:meth:`get_result` on pgtq's async connections (no thread)."""
        job_id = _job_id(result_id)
        jobs = self.app.jobs
        job = await jobs.get_async(job_id)
        if job is None:
            raise compat.TaskResultDoesNotExist(result_id)
        history = await jobs.history_async(job_id) if job.attempts else []
        return self.result_of(job, history)

    def result_of(self, job: Job, history: list[JobEvent]) -> Any:
        """Django's ``TaskResult`` for a job and its history (pure)."""
        task = _django_task(job)
        status = compat.TaskResultStatus(STATUSES[job.status])
        stored = job.args if isinstance(job.args, dict) else {}
        result = compat.TaskResult(
            task=task,
            id=str(job.id),
            status=status,
            enqueued_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at if job.status.is_final else None,
            last_attempted_at=job.started_at,
            args=stored.get("args", []),
            kwargs=stored.get("kwargs", {}),
            backend=self.alias,
            errors=_errors(job, history),
            worker_ids=_worker_ids(job, history),
        )
        if job.status is Status.SUCCEEDED:
            object.__setattr__(result, "_return_value", job.result)
        return result


def _job_id(result_id: str) -> int:
    try:
        return int(result_id)
    except (TypeError, ValueError):
        raise compat.TaskResultDoesNotExist(result_id) from None


def _django_task(job: Job) -> Any:
    """The Django task a job runs, with the job's own queue and priority."""
    try:
        task = import_string(job.task_name)
    except ImportError:
        task = None
    if not compat.is_task(task):
        raise compat.TaskResultDoesNotExist(
            f"job {job.id} runs {job.task_name!r}, which is not a Django task"
        )
    priority = min(max(job.priority, _MIN_PRIORITY), _MAX_PRIORITY)
    if task.queue_name == job.queue and task.priority == priority:
        return task
    try:
        return task.using(queue_name=job.queue, priority=priority)
    except compat.InvalidTaskError:  # a queue this backend does not list: as declared
        return task


def _exception_path(error: dict[str, Any]) -> str:
    """An exception's import path: the last line of its traceback names it with its module
    (``myapp.errors.Oops: ...``; a builtin by its name alone, ``ValueError: ...``)."""
    name = str(error.get("type") or "Exception")
    lines = [line for line in str(error.get("traceback") or "").splitlines() if line.strip()]
    if lines:
        head = lines[-1].split(":", 1)[0].strip()
        if head.endswith(name) and " " not in head:
            name = head
    return name if "." in name else f"builtins.{name}"


def _errors(job: Job, history: list[JobEvent]) -> list[Any]:
    records = [e.error for e in history if e.error]
    if job.error and (not records or records[-1] != job.error):
        records.append(job.error)
    return [
        compat.TaskError(
            exception_class_path=_exception_path(r),
            traceback=str(r.get("traceback") or f"{r.get('type')}: {r.get('message')}"),
        )
        for r in records
    ]


def _worker_ids(job: Job, history: list[JobEvent]) -> list[str]:
    """One worker id per attempt (Django's ``attempts`` is their count)."""
    by_attempt: dict[int, str] = {}
    for event in history:
        if event.worker_id and event.attempt:
            by_attempt[event.attempt] = event.worker_id
    if job.worker_id and job.attempts:
        by_attempt.setdefault(job.attempts, job.worker_id)
    return [by_attempt.get(n, "") for n in range(1, job.attempts + 1)]


__all__ = ["STATUSES", "PgtqBackend"]
