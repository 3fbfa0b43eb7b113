"""The Django app ``pgtq.contrib.django`` (label ``pgtq``)."""

from __future__ import annotations

from django.apps import AppConfig


class PgtqConfig(AppConfig):
    """pgtq's Django app: its management command, migration and admin."""

    name = "pgtq.contrib.django"
    label = "pgtq"
    verbose_name = "pgtq task queue"
    default_auto_field = "django.db.models.BigAutoField"
