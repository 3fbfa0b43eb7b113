"""pgtq: a PostgreSQL task queue with a sync and an async API over one job model."""

import logging

from pgtq.app import App
from pgtq.blueprints import Blueprint, BlueprintTask
from pgtq.errors import (
    AlreadyEnqueued,
    ConfigurationError,
    DatabaseUnreachable,
    InvalidArguments,
    JobFailed,
    JobIsRunning,
    JobNotFound,
    JobTimeout,
    PgtqError,
    SchemaNotMigrated,
    SchemaTooNew,
    SchemaTooOld,
    UnknownSchedule,
    UnknownTask,
)
from pgtq.factories import AppFactory, open_app, open_app_async
from pgtq.jobs import Job, JobContext, JobManager, State, Status
from pgtq.model import Deferred, JobEvent
from pgtq.outcomes import Discard, Snooze
from pgtq.retry import Retry, RetryDecision
from pgtq.tasks import Deferrer, Task
from pgtq.workflows import Batch, Chain, Group, Signature, Workflow, chain, group

__version__ = "0.1.0"

# A library prints nothing unless the application configures logging.
logging.getLogger("pgtq").addHandler(logging.NullHandler())

__all__ = [
    "AlreadyEnqueued",
    "App",
    "AppFactory",
    "Batch",
    "Blueprint",
    "BlueprintTask",
    "Chain",
    "ConfigurationError",
    "DatabaseUnreachable",
    "Deferred",
    "Deferrer",
    "Discard",
    "Group",
    "InvalidArguments",
    "Job",
    "JobContext",
    "JobEvent",
    "JobFailed",
    "JobIsRunning",
    "JobManager",
    "JobNotFound",
    "JobTimeout",
    "PgtqError",
    "Retry",
    "RetryDecision",
    "SchemaNotMigrated",
    "SchemaTooNew",
    "SchemaTooOld",
    "Signature",
    "Snooze",
    "State",
    "Status",
    "Task",
    "UnknownSchedule",
    "UnknownTask",
    "Workflow",
    "__version__",
    "chain",
    "group",
    "open_app",
    "open_app_async",
]
