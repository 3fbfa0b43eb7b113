"""pgtq's schema, by pgtq's own Alembic revisions (pgtq.contrib.django.operations)."""

from typing import ClassVar

from django.db import migrations

from pgtq.contrib.django.operations import MigratePgtq


class Migration(migrations.Migration):
    initial = True
    atomic = False  # pgtq's revisions commit on a connection of their own
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[migrations.operations.base.Operation]] = [MigratePgtq()]
