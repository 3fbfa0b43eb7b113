"""Schema version hints: a pgtq pointed at a schema it does not fit says what to run.

Each test migrates a fresh database to the revision it needs (or stamps one this pgtq does
not ship, as a newer release would have), then checks ``migrations.schema_status``, the
worker's start-up check and the CLI's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from typer.testing import CliRunner

import pgtq
from pgtq import migrations, revisions
from pgtq.cli import cli
from pgtq.errors import SchemaTooNew, SchemaTooOld
from tests.sides import Side

#: pgtq's revisions, oldest first, each with its phase.
REVISIONS = [
    (r.revision, migrations.phase_of(r))
    for r in reversed(list(migrations._script().walk_revisions()))
]
HEAD = REVISIONS[-1][0]
#: The newest pre revision: a schema just before it lacks what this pgtq needs.
LAST_PRE = next(rev for rev, phase in reversed(REVISIONS) if phase == "pre")
BEFORE_LAST_PRE = REVISIONS[[rev for rev, _ in REVISIONS].index(LAST_PRE) - 1][0]
#: A revision no pgtq ships yet: what a newer release leaves in the version table.
NEWER = "pgtq_9999"


@pytest.fixture
def url(make_database: Callable[[], URL]) -> URL:
    return make_database()


@pytest.fixture
def engine(url: URL) -> Iterator[Engine]:
    eng = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    yield eng
    eng.dispose()


def migrate_to(engine: Engine, revision: str) -> None:
    with engine.begin() as conn:
        migrations.upgrade(conn, "pgtq", revision)


def stamp(engine: Engine, revision: str) -> None:
    """Record ``revision`` as pgtq's, as a newer release migrating the schema would."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE pgtq.alembic_version SET version_num = :v"), {"v": revision})


def status(engine: Engine) -> migrations.SchemaStatus:
    with engine.connect() as conn:
        return migrations.schema_status(conn, "pgtq")


def dsn(url: URL) -> str:
    return url.render_as_string(hide_password=False)


# -- schema_status ---------------------------------------------------------------------------------


def test_a_fresh_database_is_missing(engine: Engine) -> None:
    assert status(engine).state == "missing"
    with engine.connect() as conn, pytest.raises(pgtq.SchemaNotMigrated, match="pgtq migrate"):
        migrations.require_schema(conn, "pgtq")


def test_at_head_is_current(engine: Engine) -> None:
    migrate_to(engine, "heads")
    found = status(engine)
    assert (found.state, found.found, found.message) == ("current", frozenset({HEAD}), "")
    with engine.connect() as conn:
        assert migrations.schema_state(conn, "pgtq") == "current"


def test_pending_post_revisions_are_current(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `pgtq migrate --pre`, the new release runs before its post revisions: a schema
    whose only pending revisions are post ones is current. (pgtq's newest revision is a pre
    one today: it is made a post one here.)"""
    newest, _ = revisions.REVISIONS[-1]
    monkeypatch.setattr(revisions, "REVISIONS", (*revisions.REVISIONS[:-1], (newest, "post")))
    migrate_to(engine, REVISIONS[-2][0])
    assert status(engine).state == "current"
    monkeypatch.undo()
    assert status(engine).state == "behind"


def test_a_pending_pre_revision_is_behind(engine: Engine) -> None:
    migrate_to(engine, BEFORE_LAST_PRE)
    found = status(engine)
    assert found.state == "behind"
    assert found.needed[-1] == LAST_PRE
    assert found.message == (
        f"pgtq's schema in 'pgtq' is at {BEFORE_LAST_PRE}, this pgtq needs {LAST_PRE}: "
        "run `pgtq migrate` (`pgtq migrate --pre` during a rolling upgrade)"
    )
    with engine.connect() as conn, pytest.raises(SchemaTooOld, match="run `pgtq migrate`"):
        migrations.require_schema(conn, "pgtq")


def test_an_unknown_revision_is_ahead(engine: Engine) -> None:
    migrate_to(engine, "heads")
    stamp(engine, NEWER)
    found = status(engine)
    assert (found.state, found.unknown) == ("ahead", frozenset({NEWER}))
    assert found.message == (
        f"the schema in 'pgtq' is at {NEWER}, newer than this pgtq knows ({HEAD}): "
        "this pgtq is older than the schema; upgrade pgtq"
    )
    with engine.connect() as conn:
        assert migrations.require_schema(conn, "pgtq").state == "ahead"  # a warning by default
        with pytest.raises(SchemaTooNew, match="this pgtq is older than the schema"):
            migrations.require_schema(conn, "pgtq", allow_newer=False)


def test_tables_managed_by_another_version_table_are_not_checked(engine: Engine) -> None:
    """pgtq's revisions inside a user's Alembic project are recorded in the project's own
    version table: pgtq cannot tell, and lets them be."""
    migrate_to(engine, "heads")
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE pgtq.alembic_version"))
    assert status(engine).state == "unmanaged"


# -- the worker ------------------------------------------------------------------------------------


async def test_a_worker_refuses_a_schema_behind_it(side: Side, engine: Engine, url: URL) -> None:
    migrate_to(engine, BEFORE_LAST_PRE)
    app = pgtq.App(dsn(url))
    try:
        with pytest.raises(SchemaTooOld, match=r"needs .*: run `pgtq migrate`"):
            await side.run_worker(app, wait=False)
    finally:
        await app.close_async()


async def test_a_worker_refuses_a_missing_schema(side: Side, url: URL) -> None:
    app = pgtq.App(dsn(url))
    try:
        with pytest.raises(pgtq.SchemaNotMigrated, match="tables are missing"):
            await side.run_worker(app, wait=False)
    finally:
        await app.close_async()


async def test_a_worker_on_a_newer_schema_warns_and_runs(
    side: Side, engine: Engine, url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    migrate_to(engine, "heads")
    stamp(engine, NEWER)
    app = pgtq.App(dsn(url))

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    try:
        job_id = await side.defer(add, a=1, b=2)
        with caplog.at_level(logging.WARNING, logger="pgtq"):
            stats = await side.run_worker(app, wait=False)
        assert stats.by_status == {"succeeded": 1}
        assert await side.wait(app, job_id) == 3
    finally:
        await app.close_async()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"the schema in 'pgtq' is at {NEWER}, newer than this pgtq knows ({HEAD}): "
        "this pgtq is older than the schema; upgrade pgtq"
    ]


# -- the CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_commands_refuse_a_schema_behind_them(engine: Engine, url: URL) -> None:
    migrate_to(engine, BEFORE_LAST_PRE)
    for args in (["jobs", "list"], ["jobs", "show", "1"], ["stats"], ["queues", "list"]):
        result = runner.invoke(cli, [*args, "--dsn", dsn(url)])
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: pgtq's schema in 'pgtq' is at ")
        assert "run `pgtq migrate`" in lines[0]
        assert "Traceback" not in result.output


def test_cli_commands_refuse_a_missing_schema(url: URL) -> None:
    result = runner.invoke(cli, ["jobs", "list", "--dsn", dsn(url)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: pgtq's tables are missing in schema 'pgtq': run `pgtq migrate` (or "
        "app.migrate()) first"
    ]


def test_cli_commands_warn_on_a_newer_schema(engine: Engine, url: URL) -> None:
    migrate_to(engine, "heads")
    stamp(engine, NEWER)
    result = runner.invoke(cli, ["jobs", "list", "--dsn", dsn(url)])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        f"Warning: the schema in 'pgtq' is at {NEWER}, newer than this pgtq knows ({HEAD}): "
        "this pgtq is older than the schema; upgrade pgtq"
    ]
    assert "no job matches" in result.stdout


def test_migrate_check_names_a_newer_schema(engine: Engine, url: URL) -> None:
    migrate_to(engine, "heads")
    stamp(engine, NEWER)
    result = runner.invoke(cli, ["migrate", "--check", "--dsn", dsn(url)])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and NEWER in line


def test_the_manifest_of_revisions_is_the_revision_files() -> None:
    """pgtq.revisions (what a worker checks at start, without Alembic) lists exactly the
    revisions in alembic/versions, in order, with their phases."""
    from pgtq.revisions import REVISIONS as MANIFEST

    assert list(MANIFEST) == REVISIONS


def test_a_worker_start_does_not_import_alembic(dsn: str) -> None:
    """The schema check at a worker's start is one query, not Alembic's 0.4 s import."""
    import subprocess
    import sys

    code = (
        "import sys, pgtq\n"
        f"app = pgtq.App({dsn!r})\n"
        "app.run_worker(wait=False, install_signal_handlers=False)\n"
        "print('alembic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
