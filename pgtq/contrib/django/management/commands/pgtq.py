"""``manage.py pgtq worker|migrate|stats|jobs|queues|periodic|healthcheck|web|defer ...``: the
``pgtq`` command line on the project's app (``pgtq.contrib.django:app``, built from
``settings.PGTQ`` and ``DATABASES``), with Django set up first.

Every argument after the command is the ``pgtq`` command's own (``manage.py pgtq worker
--help``); the app is added where that command takes one, so nobody types it. ``worker``
imports each installed app's ``tasks`` module first: the tasks of Django's ``@task`` are
then found by their module path, those of ``@app.task`` are registered.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.module_loading import autodiscover_modules

#: What ``pgtq ... MODULE:APP`` / ``--app`` names: the project's app.
APP_PATH = "pgtq.contrib.django:app"

#: Commands taking the app as their first argument, and those taking ``--app``.
_POSITIONAL = frozenset({"worker", "web", "healthcheck", "defer"})
_OPTION = frozenset({"migrate", "stats"})
#: Command groups: their subcommand takes ``--app`` (periodic's, a first argument).
_GROUPS_OPTION = frozenset({"jobs", "queues"})
_GROUPS_POSITIONAL = frozenset({"periodic"})

PROG = "manage.py pgtq"


def cli_arguments(argv: list[str]) -> list[str]:
    """The ``pgtq`` arguments for ``manage.py pgtq ARGV``: the project's app added where the
    command takes one (pure; tested on its own)."""
    if not argv or argv[0].startswith("-"):
        return argv
    command, rest = argv[0], argv[1:]
    if command in _POSITIONAL:
        return [command, APP_PATH, *rest]
    if command in _OPTION:
        return [command, *rest, "--app", APP_PATH]
    sub = rest[0] if rest and not rest[0].startswith("-") else None
    if sub is not None and command in _GROUPS_OPTION:
        return [command, sub, *rest[1:], "--app", APP_PATH]
    if sub is not None and command in _GROUPS_POSITIONAL:
        return [command, sub, APP_PATH, *rest[1:]]
    return argv


def run(argv: list[str]) -> int:
    """Run ``pgtq`` with :func:`cli_arguments`; its exit code."""
    from pgtq.cli import command_tree

    args = cli_arguments(argv)
    if args[:1] == ["worker"]:
        autodiscover_modules("tasks")
    try:
        command_tree(args)(args=args, prog_name=PROG)
    except SystemExit as exit:
        code = exit.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


class Command(BaseCommand):
    help = (
        "pgtq's command line on this project's database: worker, migrate, stats, jobs, "
        "queues, periodic, healthcheck, web, defer (`manage.py pgtq COMMAND --help`)."
    )

    def run_from_argv(self, argv: list[str]) -> None:
        """``manage.py pgtq ...``: every argument is pgtq's (its options, its help)."""
        sys.exit(run(argv[2:]))

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("arguments", nargs="*", help="pgtq's command and its arguments")

    def handle(self, *args: Any, **options: Any) -> None:
        """``call_command("pgtq", "stats", "--json")``."""
        code = run([*options["arguments"], *args])
        if code:
            raise CommandError(f"pgtq exited with code {code}", returncode=code)
