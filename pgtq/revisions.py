"""The schema revisions this pgtq ships, as data, and where a database's schema stands.

A worker checks the schema when it starts. Reading the revision files means importing
Alembic (~0.4 s) and loading its scripts: a fresh ``pgtq worker`` process paid that before
its first claim, a third of a 1,000-job burn-down. Here the check is one query and a
comparison with :data:`REVISIONS`, which ``tests/test_migrations.py`` checks against the
revision files in ``alembic/versions``. :mod:`pgtq.migrations` (Alembic) applies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pgtq.errors import PgtqError, SchemaNotMigrated, SchemaTooNew, SchemaTooOld
from pgtq.schema import DEFAULT_SCHEMA, validate_schema_name

#: A revision's phase in a rolling upgrade: ``pre`` is additive (the previous release's
#: workers keep working), ``post`` removes what the previous release used.
Phase = Literal["pre", "post"]

#: pgtq's revisions, oldest first, each with its phase (one linear chain, branch ``pgtq``).
REVISIONS: tuple[tuple[str, Phase], ...] = (
    ("pgtq_0001", "pre"),
    ("pgtq_0002", "pre"),
    ("pgtq_0003", "pre"),
    ("pgtq_0004", "pre"),
    ("pgtq_0005", "pre"),
    ("pgtq_0006", "post"),
    ("pgtq_0007", "pre"),
    ("pgtq_0008", "pre"),
    ("pgtq_0009", "pre"),
    ("pgtq_0010", "pre"),
    ("pgtq_0011", "pre"),
    ("pgtq_0012", "pre"),
)

#: The table where Alembic records pgtq's revisions (in pgtq's schema).
VERSION_TABLE = "alembic_version"

#: pgtq's schema compared with this pgtq's revisions (see :func:`schema_status`):
#: ``missing`` (no tables), ``behind`` (a pre revision this pgtq needs is pending), ``current``
#: (only post revisions may be pending: this release runs before they are applied), ``ahead``
#: (at a revision this pgtq does not ship: a newer pgtq migrated it), ``unmanaged`` (the tables
#: exist but pgtq's own version table does not record them: your Alembic project manages them,
#: so pgtq cannot tell and does not check).
SchemaState = Literal["missing", "behind", "current", "ahead", "unmanaged"]


@dataclass(frozen=True)
class SchemaStatus:
    """Where pgtq's schema stands against this pgtq, with the message to act on."""

    schema: str
    state: SchemaState
    #: The revisions pgtq's version table records.
    found: frozenset[str]
    #: This pgtq's newest revisions.
    heads: frozenset[str]
    #: ``behind``: the pending pre revisions this pgtq needs, oldest first.
    needed: tuple[str, ...] = ()
    #: ``ahead``: the recorded revisions this pgtq does not ship.
    unknown: frozenset[str] = frozenset()

    @property
    def message(self) -> str:
        """What is wrong and what to do (empty for ``current`` and ``unmanaged``)."""
        at = ", ".join(sorted(self.found)) or "no revision"
        head = ", ".join(sorted(self.heads))
        if self.state == "missing":
            return (
                f"pgtq's tables are missing in schema {self.schema!r}: "
                "run `pgtq migrate` (or app.migrate()) first"
            )
        if self.state == "behind":
            return (
                f"pgtq's schema in {self.schema!r} is at {at}, this pgtq needs "
                f"{self.needed[-1]}: run `pgtq migrate` (`pgtq migrate --pre` during a rolling "
                "upgrade)"
            )
        if self.state == "ahead":
            return (
                f"the schema in {self.schema!r} is at {at}, newer than this pgtq knows "
                f"({head}): this pgtq is older than the schema; upgrade pgtq"
            )
        return ""

    def error(self) -> PgtqError | None:
        """The error for this state: None when this pgtq can use the schema as it is."""
        if self.state == "missing":
            return SchemaNotMigrated(self.message)
        if self.state == "behind":
            return SchemaTooOld(self.message)
        if self.state == "ahead":
            return SchemaTooNew(self.message)
        return None


def schema_status(connection: Connection, schema: str = DEFAULT_SCHEMA) -> SchemaStatus:
    """Compare pgtq's schema with the revisions this pgtq ships (two small queries).

    Takes a sync ``Connection`` like :func:`pgtq.migrations.upgrade`; from async code run it
    through the greenlet bridge: ``await conn.run_sync(lambda c: schema_status(c, "pgtq"))``.
    """
    validate_schema_name(schema)
    has_jobs, has_versions = connection.execute(
        sa.text("SELECT to_regclass(:jobs) IS NOT NULL, to_regclass(:versions) IS NOT NULL"),
        {"jobs": f'"{schema}".jobs', "versions": f'"{schema}".{VERSION_TABLE}'},
    ).one()
    found: frozenset[str] = frozenset()
    if has_versions:
        rows = connection.execute(sa.text(f'SELECT version_num FROM "{schema}".{VERSION_TABLE}'))
        found = frozenset(str(v) for v in rows.scalars())
    return status_of(schema, bool(has_jobs), found)


def schema_state(connection: Connection, schema: str = DEFAULT_SCHEMA) -> SchemaState:
    """Just the state of :func:`schema_status`."""
    return schema_status(connection, schema).state


def status_of(schema: str, has_jobs: bool, found: frozenset[str]) -> SchemaStatus:
    """The state of a schema whose version table records ``found``: pure."""
    order = [revision for revision, _ in REVISIONS]
    heads = frozenset(order[-1:])
    if not found:
        return SchemaStatus(schema, "unmanaged" if has_jobs else "missing", found, heads)
    unknown = found - set(order)
    if unknown:
        return SchemaStatus(schema, "ahead", found, heads, unknown=unknown)
    at = max(order.index(revision) for revision in found)
    needed = tuple(revision for revision, phase in REVISIONS[at + 1 :] if phase == "pre")
    return SchemaStatus(schema, "behind" if needed else "current", found, heads, needed=needed)


def require_schema(
    connection: Connection, schema: str = DEFAULT_SCHEMA, *, allow_newer: bool = True
) -> SchemaStatus:
    """The schema's status, raising when this pgtq cannot work on it.

    ``missing`` raises :class:`SchemaNotMigrated` and ``behind`` :class:`SchemaTooOld`, each
    saying to run ``pgtq migrate``. ``ahead`` is returned (the caller warns with its
    ``message``), or raises :class:`SchemaTooNew` with ``allow_newer=False``. Why not refuse
    it: a rolling upgrade (docs/deployment.md) applies the new release's *pre* revisions while
    the previous release's workers run, and those revisions are additive, so the old workers
    must keep working. The old pgtq cannot tell a pre revision from a post one (it does not
    ship them), but post revisions are applied only once the old workers are gone, so a
    newer schema is expected at that moment, and worth a warning rather than an outage.
    Pending *post* revisions are ``current``: this release runs before they are applied.
    """
    status = schema_status(connection, schema)
    error = status.error()
    if error is not None and not (status.state == "ahead" and allow_newer):
        raise error
    return status
