"""Exceptions a user of pgtq can catch. Each message says what to do next."""

from __future__ import annotations

from typing import Any


class PgtqError(Exception):
    """Base class of every error pgtq raises on purpose."""


class ConfigurationError(PgtqError):
    """The app is set up in a way that cannot work (no DSN, bad schema name, …)."""


class DatabaseUnreachable(PgtqError):
    """PostgreSQL could not be reached at the configured host and port."""


class SchemaNotMigrated(PgtqError):
    """pgtq's tables are missing: ``pgtq migrate`` has not been run on this database."""


class SchemaTooOld(SchemaNotMigrated):
    """pgtq's schema lacks a revision this pgtq needs: ``pgtq migrate`` brings it up.

    A subclass of :class:`SchemaNotMigrated`: both are fixed by the same command.
    """


class SchemaTooNew(PgtqError):
    """pgtq's schema is at a revision this pgtq does not know: a newer pgtq migrated it.

    Workers only warn about it (a rolling upgrade applies the new release's additive
    revisions under the previous release's workers); it is raised where a caller asks for
    the schema to be exactly known, and names the cause when a query then fails.
    """


class UnknownTask(PgtqError, LookupError):
    """No task of that name is registered on the app."""


class UnknownSchedule(PgtqError, LookupError):
    """The app declares no periodic schedule of that task and periodic id."""


class InvalidArguments(PgtqError, TypeError):
    """A task was deferred with arguments it cannot take or that do not serialize to JSON."""


class AlreadyEnqueued(PgtqError):
    """A job with the same ``queueing_lock`` is already waiting: ``job_id`` is its id (None
    when it could not be told)."""

    def __init__(self, message: str, job_id: int | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFound(PgtqError, LookupError):
    """No job has that id."""


class JobIsRunning(PgtqError):
    """``fail`` was asked of a running job: its worker owns it until it ends. Stop it with
    ``abort`` (it ends ``aborted``), or let it end."""


class JobFailed(PgtqError):
    """The awaited job ended without success; ``error`` is the stored error record."""

    def __init__(self, job_id: int, status: str, error: dict[str, Any] | None) -> None:
        self.job_id = job_id
        self.status = status
        self.error = error or {}
        detail = self.error.get("message") or status
        kind = self.error.get("type")
        super().__init__(
            f"job {job_id} ended {status}: " + (f"{kind}: {detail}" if kind else detail)
        )


class JobTimeout(PgtqError, TimeoutError):
    """``wait`` gave up before the job reached a final status."""
