"""pgtq's Alembic revisions, run on their own or inside a user's Alembic project.

The revisions live in the top-level ``alembic/`` directory of a checkout; the wheel copies that
directory to ``pgtq/_alembic/``. They carry the branch label ``pgtq`` so that they can sit beside
an application's own revisions (``alembic upgrade heads`` runs both).

On their own (``pgtq migrate``, ``App.migrate``), the revisions keep their version table
``alembic_version`` inside pgtq's schema, so pgtq's history never mixes with the application's.

Every revision says which phase of a rolling upgrade it belongs to, in a module-level
``phase``: ``"pre"`` (additive: safe while workers of the previous release run) or ``"post"``
(removes what the previous release used: apply it once they are all gone).
``upgrade(..., phase="pre")`` applies the pending revisions up to the first pending post one,
``phase="post"`` the rest; in a user's Alembic project, :func:`pre_target` names the revision
to give ``alembic upgrade``.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args

import alembic.command
import alembic.context
import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.schema import SchemaItem

from pgtq.connectors import sync_url
from pgtq.errors import ConfigurationError
from pgtq.revisions import (
    VERSION_TABLE,
    Phase,
    SchemaState,
    SchemaStatus,
    require_schema,
    schema_state,
    schema_status,
)
from pgtq.schema import DEFAULT_SCHEMA, tables_for, validate_schema_name

__all__ = [
    "BRANCH",
    "SCHEMA_ATTRIBUTE",
    "SCHEMA_ENV",
    "SCRIPT_DIR",
    "VERSIONS_DIR",
    "VERSION_TABLE",
    "MigrationConflict",
    "MigrationPhaseError",
    "Phase",
    "SchemaState",
    "SchemaStatus",
    "current",
    "downgrade",
    "heads",
    "include_object",
    "pending",
    "phase_of",
    "pre_target",
    "require_schema",
    "revision_schema",
    "schema_state",
    "schema_status",
    "sql",
    "upgrade",
    "version_location",
]

PHASES: tuple[str, ...] = get_args(Phase)
#: The branch label of pgtq's revisions.
BRANCH = "pgtq"


def _script_dir() -> Path:
    """Inside the wheel (``pgtq/_alembic``), else the checkout's top-level ``alembic/``."""
    packaged = Path(__file__).resolve().parent / "_alembic"
    if (packaged / "versions").is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "alembic"


#: The directory holding ``env.py`` and ``script.py.mako``.
SCRIPT_DIR: Path = _script_dir()
#: pgtq's revisions: add this to ``version_locations`` in your own Alembic project.
VERSIONS_DIR: Path = SCRIPT_DIR / "versions"

#: The ``Config.attributes`` key that tells the revisions which schema to build.
SCHEMA_ATTRIBUTE = "pgtq_schema"
#: The environment variable read by the revisions when no attribute is set (your own project).
SCHEMA_ENV = "PGTQ_SCHEMA"
# Alembic's ``context`` and ``op`` are module-level proxies: two migrations in two threads of
# one process would overwrite each other's. Re-entrant, so that a second migration on the same
# thread (another coroutine inside AsyncConnection.run_sync) cannot deadlock the event loop; it
# is not serialized either, so do not run two migrations at once on one event loop.
_ALEMBIC_LOCK = threading.RLock()


class MigrationConflict(ConfigurationError):
    """pgtq's tables exist but pgtq's own version table does not know them, or the database
    is at a pgtq revision this pgtq does not ship (a newer release migrated it)."""


class MigrationPhaseError(ConfigurationError):
    """``phase="pre"`` cannot apply what the new release needs: a post revision comes first."""


def version_location() -> str:
    """``VERSIONS_DIR`` as a string, for ``version_locations`` set in code."""
    return str(VERSIONS_DIR)


def revision_schema() -> str:
    """The schema a revision builds: set by :func:`upgrade`, else ``PGTQ_SCHEMA``, else ``pgtq``.

    Revisions call it inside ``upgrade()``/``downgrade()``, where Alembic's context is set.
    """
    try:
        attributes: dict[Any, Any] = alembic.context.config.attributes
    except AttributeError:  # no migration is running: Alembic's proxy is not installed
        attributes = {}
    name = attributes.get(SCHEMA_ATTRIBUTE) or os.environ.get(SCHEMA_ENV) or DEFAULT_SCHEMA
    return validate_schema_name(name)


def include_object(
    obj: SchemaItem, name: str | None, type_: str, reflected: bool, compare_to: SchemaItem | None
) -> bool:
    """``include_object`` for a user's env.py: autogenerate leaves pgtq's schema alone.

    pgtq's tables change only through pgtq's revisions; without this filter, autogenerate
    with ``include_schemas=True`` (or with ``pgtq.schema.metadata`` in ``target_metadata``)
    would copy pgtq's tables, or their removal, into the application's revisions.
    """
    if type_ == "table":
        return getattr(obj, "schema", None) != revision_schema()
    return True


def _config(schema: str, connection: Connection | None = None, **kwargs: Any) -> Config:
    cfg = Config(**kwargs)
    cfg.set_main_option("script_location", str(SCRIPT_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "newline")
    cfg.set_main_option("version_locations", str(VERSIONS_DIR).replace("%", "%%"))
    cfg.attributes[SCHEMA_ATTRIBUTE] = schema
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(
    connection: Connection,
    schema: str = DEFAULT_SCHEMA,
    revision: str = "heads",
    *,
    phase: Phase | None = None,
) -> list[str]:
    """Upgrade pgtq's schema on ``connection``, inside the caller's transaction (not committed).

    ``phase="pre"`` applies the pending revisions up to (not including) the first pending
    *post* revision: what a new release needs while workers of the previous one still run
    (on a fresh schema, every revision: no worker runs there yet).
    ``phase="post"`` applies the rest (everything pending). ``None``: both. Returns the
    revisions applied, oldest first.

    Concurrent upgrades of the same schema wait for each other (an advisory lock held until the
    caller's transaction ends), so every worker of a fleet may migrate at startup.
    """
    validate_schema_name(schema)
    if phase is not None and phase not in PHASES:
        raise ConfigurationError(f"phase must be 'pre', 'post' or None, not {phase!r}")
    if phase is not None and revision != "heads":
        raise ConfigurationError("give upgrade() a revision or a phase, not both")
    _lock_and_create_schema(connection, schema)
    found = current(connection, schema)
    if not found and sa.inspect(connection).has_table("jobs", schema):
        raise MigrationConflict(
            f"the table {schema}.jobs exists but {schema}.{VERSION_TABLE} has no pgtq "
            "revision: it is probably managed by your own Alembic project (pgtq's revisions "
            "in its version_locations), so run `alembic upgrade heads` there instead of "
            "`pgtq migrate` / app.migrate()"
        )
    with _ALEMBIC_LOCK:
        cfg = _config(schema, connection)
        script = ScriptDirectory.from_config(cfg)
        _check_known(script, found, f"pgtq schema {schema!r}")
        if phase == "pre":
            target = _pre_target(script, found)
            if target is None:
                return []
            revision = target
        alembic.command.upgrade(cfg, revision)
        return _between(script, current(connection, schema), found)


def pending(connection: Connection, schema: str = DEFAULT_SCHEMA) -> list[tuple[str, Phase]]:
    """The revisions ``upgrade`` would apply, oldest first, each with its phase."""
    validate_schema_name(schema)
    script = _script()
    found = current(connection, schema)
    _check_known(script, found, f"pgtq schema {schema!r}")
    return [(rev.revision, phase_of(rev)) for rev in _pending(script, found)]


def phase_of(revision: Script) -> Phase:
    """A revision's ``phase`` (its module-level ``phase = "pre"`` or ``"post"``)."""
    value = getattr(revision.module, "phase", None)
    if value not in PHASES:
        raise ConfigurationError(
            f"revision {revision.revision} ({revision.path}) must say its rolling-upgrade "
            f'phase: phase = "pre" (additive) or phase = "post" (removes what the previous '
            f"release used), not {value!r}"
        )
    phase: Phase = value
    return phase


def pre_target(
    config: Config | str | os.PathLike[str],
    connection: Connection | None = None,
    *,
    version_table: str = "alembic_version",
    version_table_schema: str | None = None,
) -> str:
    """In a user's Alembic project: the pgtq revision to give ``alembic upgrade`` for the *pre*
    phase of a rolling upgrade (``alembic upgrade heads`` is the *post* phase).

    It is the last pending revision of pgtq's branch before the first pending post one (the
    branch's head when none of it is applied yet), or the current pgtq revision when no pre
    revision is pending (upgrading to it changes nothing). ``config`` is the project's
    ``Config`` or the path of its ``alembic.ini``; without ``connection`` it connects to the
    config's ``sqlalchemy.url``. The version table is read as Alembic's default
    (``alembic_version``); pass the names your ``env.py`` sets.
    Raises :class:`MigrationPhaseError` when a pending post revision comes before a pending
    pre one.
    """
    cfg = config if isinstance(config, Config) else Config(os.fspath(config))
    script = ScriptDirectory.from_config(cfg)
    if connection is None:
        url = cfg.get_main_option("sqlalchemy.url")
        if not url:
            raise ConfigurationError("pre_target: pass a connection or set sqlalchemy.url")
        engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                return pre_target(
                    cfg,
                    conn,
                    version_table=version_table,
                    version_table_schema=version_table_schema,
                )
        finally:
            engine.dispose()
    context = MigrationContext.configure(
        connection,
        opts={"version_table": version_table, "version_table_schema": version_table_schema},
    )
    heads_found = set(context.get_current_heads())
    _check_known(script, heads_found, "the project")
    found = {h for h in heads_found if _on_branch(script, h)}
    target = _pre_target(script, found)
    if target is not None:
        return target
    if found:
        return next(iter(found))
    return f"{BRANCH}@base"


# -- planning: which revisions a phase applies (pure, over a ScriptDirectory) ---------------------


def _script() -> ScriptDirectory:
    return ScriptDirectory(str(SCRIPT_DIR), version_locations=[str(VERSIONS_DIR)])


def _on_branch(script: ScriptDirectory, revision: str) -> bool:
    rev = script.get_revision(revision)
    return rev is not None and BRANCH in rev.branch_labels


def _check_known(script: ScriptDirectory, found: Iterable[str], where: str) -> None:
    for revision in found:
        try:
            script.get_revision(revision)
        except CommandError:
            raise MigrationConflict(
                f"{where} is at revision {revision!r}, which this pgtq does not ship: a newer "
                "release migrated it. Run that release's migrations (or `pgtq migrate` of "
                "that release), not this one's"
            ) from None


def _pending(script: ScriptDirectory, found: set[str]) -> list[Script]:
    """pgtq's revisions after ``found`` (pgtq's current revision, if any), oldest first."""
    lower = next(iter(found)) if found else "base"
    return list(reversed(list(script.iterate_revisions(f"{BRANCH}@head", lower))))


def _between(script: ScriptDirectory, upper: set[str], lower: set[str]) -> list[str]:
    if upper == lower or not upper:
        return []
    top = next(iter(upper))
    bottom = next(iter(lower)) if lower else "base"
    return [r.revision for r in reversed(list(script.iterate_revisions(top, bottom)))]


def _pre_target(script: ScriptDirectory, found: set[str]) -> str | None:
    """The last pending revision before the first pending post one (None: none pending).

    On a fresh schema (``found`` empty) that is the last revision: no worker of any release
    runs on tables that do not exist yet, so a post revision removes nothing anyone uses
    (and stopping before it would leave the pre revisions after it out of reach).
    """
    todo = _pending(script, found)
    if not found:
        return todo[-1].revision if todo else None
    target: str | None = None
    for i, rev in enumerate(todo):
        if phase_of(rev) == "post":
            later = [r.revision for r in todo[i + 1 :] if phase_of(r) == "pre"]
            if later:
                raise MigrationPhaseError(
                    f"the post revision {rev.revision} is pending before the pre revision(s) "
                    f"{', '.join(later)}, so a pre-only upgrade cannot reach them: the "
                    f"release that shipped {rev.revision} was not finished. If no worker "
                    f"older than that release still runs, apply everything (`pgtq migrate`, "
                    f"or `--post`); otherwise finish that release's rollout first"
                )
            break
        target = rev.revision
    return target


def downgrade(connection: Connection, schema: str = DEFAULT_SCHEMA, revision: str = "base") -> None:
    """Downgrade pgtq's schema; ``base`` drops pgtq's tables but keeps the schema itself."""
    validate_schema_name(schema)
    _lock_and_create_schema(connection, schema)
    with _ALEMBIC_LOCK:
        alembic.command.downgrade(_config(schema, connection), revision)


def current(connection: Connection, schema: str = DEFAULT_SCHEMA) -> set[str]:
    """The revisions pgtq's version table records (empty when never migrated)."""
    validate_schema_name(schema)
    context = MigrationContext.configure(
        connection, opts={"version_table_schema": schema, "version_table": VERSION_TABLE}
    )
    return set(context.get_current_heads())


def heads() -> set[str]:
    """The newest revisions this version of pgtq ships: ``current()`` equals it when migrated."""
    return set(_script().get_heads())


# The schema version checks (schema_status, require_schema) live in pgtq.revisions, which
# needs no Alembic: a worker checks the schema at every start.


def sql(schema: str = DEFAULT_SCHEMA, revision: str = "heads") -> str:
    """The upgrade as a SQL script (Alembic's offline mode), for a DBA to review and run."""
    validate_schema_name(schema)
    buffer = io.StringIO()
    with _ALEMBIC_LOCK:
        alembic.command.upgrade(_config(schema, output_buffer=buffer), revision, sql=True)
    return buffer.getvalue()


def _lock_and_create_schema(connection: Connection, schema: str) -> None:
    for statement in _prologue(schema):
        connection.execute(sa.text(statement))


def _prologue(schema: str) -> list[str]:
    """Serialize migrations of one schema, then make sure the version table has a home."""
    return [
        f"SELECT pg_advisory_xact_lock(hashtext('pgtq.migrate'), hashtext('{schema}'))",
        f'CREATE SCHEMA IF NOT EXISTS "{schema}"',
    ]


def run_env() -> None:
    """The body of pgtq's ``alembic/env.py``: online on the caller's connection, or offline.

    Without a connection in ``config.attributes`` (a developer running the ``alembic`` command
    on ``alembic/alembic.ini``), it connects to ``sqlalchemy.url`` or ``PGTQ_DSN``.
    """
    schema = revision_schema()
    options: dict[str, Any] = {
        "version_table": VERSION_TABLE,
        "version_table_schema": schema,
        "target_metadata": tables_for(schema).metadata,
        "include_schemas": True,
        "include_name": lambda name, type_, parents: type_ != "schema" or name == schema,
        "compare_server_default": True,
    }
    config = alembic.context.config
    if alembic.context.is_offline_mode():
        # ``named``: the script has no parameters, so a ``%`` (in a function's RAISE) stays
        # itself rather than the ``%%`` the default ``pyformat`` escapes it to.
        alembic.context.configure(
            dialect_name="postgresql",
            dialect_opts={"paramstyle": "named"},
            literal_binds=True,
            **options,
        )
        with alembic.context.begin_transaction():
            for statement in _prologue(schema):
                alembic.context.execute(statement)
            alembic.context.run_migrations()
        return

    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _run_online(connection, schema, options)
        return
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("PGTQ_DSN")
    if not url:
        raise ConfigurationError("set sqlalchemy.url or PGTQ_DSN to run pgtq's revisions")
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            _lock_and_create_schema(conn, schema)
            _run_online(conn, schema, options)
    finally:
        engine.dispose()


def _run_online(connection: Connection, schema: str, options: dict[str, Any]) -> None:
    alembic.context.configure(connection=connection, **options)
    with alembic.context.begin_transaction():
        alembic.context.run_migrations()
