"""Read-only Django models over pgtq's tables, for the admin and the ORM (``managed = False``:
pgtq's Alembic revisions own the tables; these only read them).

Write through pgtq's API, never these models: a status changes in one statement of
``pgtq.statements`` (``app.jobs.retry_many``, ...), which the admin's actions call.
"""

from __future__ import annotations

from django.db import models

from pgtq.contrib.django.integration import pgtq_settings
from pgtq.model import Status
from pgtq.schema import DEFAULT_SCHEMA


def table_name(table: str) -> str:
    """``db_table`` of a table in pgtq's schema (``PGTQ["SCHEMA"]``): Django quotes it as
    ``"schema"."table"``."""
    schema = pgtq_settings().get("SCHEMA") or DEFAULT_SCHEMA
    return f'{schema}"."{table}'


class TextArray(models.Field):
    """A PostgreSQL ``text[]`` read as a list (psycopg's own conversion). Not Django's
    ``ArrayField``, which needs ``django.contrib.postgres`` installed from Django 6."""

    description = "a PostgreSQL text[]"

    def db_type(self, connection: object) -> str:
        return "text[]"


STATUS_CHOICES = [(s.value, s.value) for s in Status]


class Job(models.Model):
    """A row of ``pgtq.jobs``."""

    id = models.BigAutoField(primary_key=True)
    queue = models.TextField()
    task_name = models.TextField("task")
    args = models.JSONField("arguments")
    status = models.TextField(choices=STATUS_CHOICES)
    priority = models.IntegerField()
    scheduled_at = models.DateTimeField(null=True)
    lock = models.TextField(null=True)
    queueing_lock = models.TextField(null=True)
    concurrency_key = models.TextField(null=True)
    attempts = models.IntegerField()
    worker_id = models.TextField("worker", null=True)
    abort_requested = models.BooleanField()
    result = models.JSONField(null=True)
    error = models.JSONField(null=True)
    created_at = models.DateTimeField()
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)
    tags = TextArray(null=True)
    meta = models.JSONField(null=True)
    progress = models.JSONField(null=True)

    class Meta:
        managed = False
        db_table = table_name("jobs")
        ordering = ("-id",)
        permissions = (
            ("retry_job", "Can retry failed, aborted or cancelled jobs"),
            ("abort_job", "Can abort waiting or running jobs"),
            ("cancel_job", "Can cancel waiting jobs"),
        )

    def __str__(self) -> str:
        return f"job {self.pk} ({self.task_name}, {self.status})"


class JobEvent(models.Model):
    """A row of ``pgtq.job_events``: what a job's row forgot (earlier attempts' ends, rescues,
    retries). A job's whole history is ``app.jobs.history(id)``, shown on its admin page."""

    id = models.BigAutoField(primary_key=True)
    job = models.ForeignKey(
        Job, on_delete=models.DO_NOTHING, db_constraint=False, related_name="events"
    )
    type = models.TextField()
    at = models.DateTimeField()
    attempt = models.IntegerField()
    worker_id = models.TextField("worker", null=True)
    error = models.JSONField(null=True)

    class Meta:
        managed = False
        db_table = table_name("job_events")
        ordering = ("-id",)

    def __str__(self) -> str:
        return f"{self.type} of job {self.job_id} (attempt {self.attempt})"


class Worker(models.Model):
    """A row of ``pgtq.workers``: a running worker and its last heartbeat."""

    id = models.TextField(primary_key=True)
    hostname = models.TextField()
    pid = models.IntegerField()
    queues = TextArray(null=True)
    started_at = models.DateTimeField()
    last_heartbeat = models.DateTimeField()

    class Meta:
        managed = False
        db_table = table_name("workers")
        ordering = ("-last_heartbeat",)

    def __str__(self) -> str:
        return str(self.id)


class Queue(models.Model):
    """A row of ``pgtq.queues``: a queue workers declared, paused or not, and its limits."""

    name = models.TextField(primary_key=True)
    paused = models.BooleanField()
    paused_at = models.DateTimeField(null=True)
    concurrency = models.IntegerField(null=True)
    rate_limit = models.FloatField(null=True)

    class Meta:
        managed = False
        db_table = table_name("queues")
        ordering = ("name",)
        permissions = (("pause_queue", "Can pause and resume queues"),)

    def __str__(self) -> str:
        return str(self.name)


__all__ = ["STATUS_CHOICES", "Job", "JobEvent", "Queue", "Worker", "table_name"]
