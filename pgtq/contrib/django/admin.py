"""pgtq in Django's admin: jobs (filters by status, queue and task; search in the arguments;
each job's history), events, workers and queues, all read-only. The actions (retry, abort,
cancel jobs; pause, resume queues) call pgtq's API, one statement each, and need their own
permission (``pgtq.retry_job``, ``pgtq.abort_job``, ``pgtq.cancel_job``,
``pgtq.pause_queue``), which a superuser has and a staff user is given like any other."""

from __future__ import annotations

from typing import Any, cast

from django.contrib import admin, messages
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from pgtq.contrib.django.integration import DjangoApp, get_app
from pgtq.contrib.django.models import Job, JobEvent, Queue, Worker
from pgtq.errors import PgtqError


def _app() -> DjangoApp:
    return get_app()


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows of pgtq's tables are shown, never edited: pgtq changes them (the actions call it)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _report(
    admin_: admin.ModelAdmin,
    request: HttpRequest,
    verb: str,
    done: list[int],
    asked: int,
) -> None:
    level = messages.SUCCESS if len(done) == asked else messages.WARNING
    admin_.message_user(request, f"{verb} {len(done)} of {asked} selected job(s)", level)


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "task_name",
        "queue",
        "status",
        "priority",
        "attempts",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "queue", "task_name")
    search_fields = ("args", "task_name", "queueing_lock", "lock")
    readonly_fields = ("history",)
    fields = (
        ("id", "task_name", "queue", "status"),
        ("priority", "attempts", "worker_id", "abort_requested"),
        ("created_at", "scheduled_at", "started_at", "finished_at"),
        "args",
        "result",
        "error",
        ("lock", "queueing_lock", "concurrency_key"),
        ("tags", "meta", "progress"),
        "history",
    )
    actions = ("retry_jobs", "abort_jobs", "cancel_jobs")

    @admin.display(description="history")
    def history(self, job: Job) -> str:
        """Every status change of the job (``app.jobs.history``: stored events and the row's
        current attempt), each failed attempt with its error."""
        events = _app().jobs.history(job.pk)
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    e.at,
                    e.type,
                    e.attempt,
                    e.worker_id or "",
                    (f"{e.error.get('type')}: {e.error.get('message')}" if e.error else ""),
                )
                for e in events
            ),
        )
        return cast(
            str,
            format_html(
                "<table><thead><tr><th>at</th><th>event</th><th>attempt</th><th>worker</th>"
                "<th>error</th></tr></thead><tbody>{}</tbody></table>",
                rows,
            ),
        )

    @admin.action(description="Retry the selected jobs", permissions=["retry"])
    def retry_jobs(self, request: HttpRequest, queryset: Any) -> None:
        ids = list(queryset.values_list("id", flat=True))
        try:
            done = _app().jobs.retry_many(ids=ids)
        except PgtqError as exc:
            self.message_user(request, f"nothing retried: {exc}", messages.ERROR)
            return
        _report(self, request, "Retried", done, len(ids))

    @admin.action(description="Abort the selected jobs", permissions=["abort"])
    def abort_jobs(self, request: HttpRequest, queryset: Any) -> None:
        ids = list(queryset.values_list("id", flat=True))
        _report(self, request, "Aborted", _app().jobs.abort_many(ids=ids), len(ids))

    @admin.action(description="Cancel the selected waiting jobs", permissions=["cancel"])
    def cancel_jobs(self, request: HttpRequest, queryset: Any) -> None:
        ids = list(queryset.values_list("id", flat=True))
        _report(self, request, "Cancelled", _app().jobs.cancel_many(ids=ids), len(ids))

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("pgtq.retry_job"))

    def has_abort_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("pgtq.abort_job"))

    def has_cancel_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("pgtq.cancel_job"))


@admin.register(JobEvent)
class JobEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "job_id", "type", "at", "attempt", "worker_id")
    list_filter = ("type",)
    search_fields = ("=job__id",)


@admin.register(Worker)
class WorkerAdmin(ReadOnlyAdmin):
    list_display = ("id", "hostname", "pid", "queues", "started_at", "last_heartbeat")


@admin.register(Queue)
class QueueAdmin(ReadOnlyAdmin):
    list_display = ("name", "paused", "paused_at", "concurrency", "rate_limit")
    list_filter = ("paused",)
    actions = ("pause_queues", "resume_queues")

    @admin.action(description="Pause the selected queues", permissions=["pause"])
    def pause_queues(self, request: HttpRequest, queryset: Any) -> None:
        names = list(queryset.values_list("name", flat=True))
        for name in names:
            _app().queues.pause(name)
        self.message_user(request, f"Paused {len(names)} queue(s): {', '.join(names)}")

    @admin.action(description="Resume the selected queues", permissions=["pause"])
    def resume_queues(self, request: HttpRequest, queryset: Any) -> None:
        names = list(queryset.values_list("name", flat=True))
        for name in names:
            _app().queues.resume(name)
        self.message_user(request, f"Resumed {len(names)} queue(s): {', '.join(names)}")

    def has_pause_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("pgtq.pause_queue"))


__all__ = ["JobAdmin", "JobEventAdmin", "QueueAdmin", "ReadOnlyAdmin", "WorkerAdmin"]
