"""Django's Tasks framework from Django itself (6.0+, ``django.tasks``) or from the
``django-tasks`` backport (Django 5.2 on Python 3.11, ``django_tasks``): the same API, one
import place, so the rest of ``pgtq.contrib.django`` never asks which one it has."""

from __future__ import annotations

from typing import Any

try:  # Django >= 6.0
    from django.tasks import (
        DEFAULT_TASK_BACKEND_ALIAS,
        TaskContext,
        TaskResult,
        TaskResultStatus,
        task_backends,
    )
    from django.tasks.backends.base import (
        BaseTaskBackend,
    )
    from django.tasks.base import (
        Task,
        TaskError,
    )
    from django.tasks.exceptions import (
        InvalidTask as InvalidTaskError,
    )
    from django.tasks.exceptions import (
        TaskResultDoesNotExist,
    )
    from django.tasks.signals import (
        task_enqueued,
        task_finished,
        task_started,
    )

    try:
        from django.utils.json import (
            normalize_json,
        )
    except ImportError:  # where Django 6.0 keeps it otherwise
        from django.tasks.utils import (
            normalize_json,
        )

    SOURCE = "django.tasks"
except ImportError:  # Django 5.2 with the backport
    from django_tasks import (
        DEFAULT_TASK_BACKEND_ALIAS,
        TaskContext,
        TaskResult,
        TaskResultStatus,
        task_backends,
    )
    from django_tasks.backends.base import (
        BaseTaskBackend,
    )
    from django_tasks.base import (
        Task,
        TaskError,
    )
    from django_tasks.exceptions import (
        InvalidTaskError,
        TaskResultDoesNotExist,
    )
    from django_tasks.signals import (
        task_enqueued,
        task_finished,
        task_started,
    )
    from django_tasks.utils import (
        normalize_json,
    )

    SOURCE = "django_tasks"


def is_task(obj: Any) -> bool:
    """A Django task object (what ``@task`` made), not a plain function."""
    return isinstance(obj, Task)


__all__ = [
    "DEFAULT_TASK_BACKEND_ALIAS",
    "SOURCE",
    "BaseTaskBackend",
    "InvalidTaskError",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskResult",
    "TaskResultDoesNotExist",
    "TaskResultStatus",
    "is_task",
    "normalize_json",
    "task_backends",
    "task_enqueued",
    "task_finished",
    "task_started",
]
