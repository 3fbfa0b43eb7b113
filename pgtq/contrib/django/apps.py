"""The Django app ``pgtq.contrib.django`` (label ``pgtq``)."""

from __future__ import annotations

from django.apps import AppConfig


class PgtqConfig(AppConfig):
    """pgtq's Django app: its management command, migration and admin."""

    name = "pgtq.contrib.django"
    label = "pgtq"
    verbose_name = "pgtq task queue"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from pgtq.contrib.django.operations import after_migrate

        post_migrate.connect(after_migrate, sender=self, dispatch_uid="pgtq-to-head")
