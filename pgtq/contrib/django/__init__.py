"""pgtq in a Django project (``pip install 'pgtq[django]'``; docs/howto/django.md).

- ``TASKS = {"default": {"BACKEND": "pgtq.contrib.django.PgtqBackend"}}``: Django's Tasks
  framework on pgtq (:mod:`pgtq.contrib.django.backend`); enqueue joins ``atomic()``.
- ``from pgtq.contrib.django import app``: pgtq's own API on the project's database
  (``settings.PGTQ``; :mod:`pgtq.contrib.django.integration`).
- ``INSTALLED_APPS += ["pgtq.contrib.django"]``: ``manage.py pgtq ...``, pgtq's schema in
  ``manage.py migrate``, and the admin's read-only views of jobs, workers and queues.

Names are loaded on first use: importing this package needs no configured settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgtq.contrib.django.backend import PgtqBackend
    from pgtq.contrib.django.integration import DjangoApp

    app: DjangoApp

__all__ = ["PgtqBackend", "app", "get_app"]


def get_app(database: str | None = None) -> DjangoApp:
    """The project's pgtq app (``DATABASES[database]``, default ``PGTQ["DATABASE"]``)."""
    from pgtq.contrib.django.integration import get_app as make

    return make(database)


def __getattr__(name: str) -> Any:
    if name == "PgtqBackend":
        from pgtq.contrib.django.backend import PgtqBackend

        return PgtqBackend
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
