"""pgtq's Alembic revisions: they build exactly ``pgtq/schema.py``, run on their own (sync and
async), inside a user's Alembic project, and from an installed wheel."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import alembic.command
import psycopg
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import URL, Engine

import pgtq
from pgtq import migrations
from pgtq.schema import InvalidSchemaName, notify_channel, tables_for
from pgtq.statements import parse_announcement
from tests.conftest import libpq
from tests.sides import Side

REPO_ROOT = Path(__file__).resolve().parent.parent
HEADS = migrations.heads()


@pytest.fixture
def engine(make_database: Callable[[], URL]) -> Iterator[Engine]:
    """A sync engine on a fresh, empty database."""
    url = make_database().set(drivername="postgresql+psycopg")
    eng = sa.create_engine(url, poolclass=sa.pool.NullPool)
    yield eng
    eng.dispose()


PGTQ_TABLES = {
    "alembic_version",
    "job_dependencies",
    "job_events",
    "jobs",
    "limit_buckets",
    "periodic_schedules",
    "periodic_ticks",
    "queues",
    "watchers",
    "workers",
}


def tables_in(conn: sa.Connection, schema: str) -> set[str]:
    return set(sa.inspect(conn).get_table_names(schema=schema))


# -- the revisions are the files they should be ---------------------------------------------------


def test_revisions_are_found_in_the_checkout() -> None:
    assert migrations.VERSIONS_DIR == REPO_ROOT / "alembic" / "versions"
    assert migrations.version_location() == str(migrations.VERSIONS_DIR)
    assert (migrations.SCRIPT_DIR / "env.py").is_file()
    assert (migrations.SCRIPT_DIR / "script.py.mako").is_file()
    # A package named alembic at the project root would shadow the alembic library.
    assert not list((REPO_ROOT / "alembic").rglob("__init__.py"))
    assert len(HEADS) == 1


def test_revisions_are_frozen_snapshots() -> None:
    """A revision that imported schema.py's tables would change whenever schema.py does."""
    for path in migrations.VERSIONS_DIR.glob("*.py"):
        text = path.read_text()
        assert "pgtq.schema" not in text, path.name
        assert "revision_schema()" in text, path.name


def test_revision_schema_outside_a_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(migrations.SCHEMA_ENV, raising=False)
    assert migrations.revision_schema() == "pgtq"
    monkeypatch.setenv(migrations.SCHEMA_ENV, "jobs_custom")
    assert migrations.revision_schema() == "jobs_custom"
    monkeypatch.setenv(migrations.SCHEMA_ENV, "Robert'); DROP TABLE students;--")
    with pytest.raises(InvalidSchemaName):
        migrations.revision_schema()


# -- drift: the revisions build what schema.py describes ------------------------------------------


@pytest.mark.parametrize("schema", ["pgtq", "jobs_custom"])
def test_no_drift_from_schema_py(engine: Engine, schema: str) -> None:
    with engine.begin() as conn:
        migrations.upgrade(conn, schema)

    def diff(conn: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_schemas": True,
                "include_name": lambda name, type_, parents: (
                    name == schema if type_ == "schema" else name != "alembic_version"
                ),
                "version_table_schema": schema,
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        return list(compare_metadata(context, tables_for(schema).metadata))

    with engine.connect() as conn:
        assert diff(conn) == []
        # The comparison does look at pgtq's schema: a missing index shows up.
        conn.execute(sa.text(f'DROP INDEX "{schema}".jobs_worker_doing_idx'))
        assert diff(conn) != []
        conn.rollback()


_CATALOG = {
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %(schema)s AND c.relkind = 'r' AND a.attnum > 0
          AND NOT a.attisdropped AND c.relname <> 'alembic_version'
        ORDER BY 1, 2""",
    "constraints": """
        SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = k.connamespace
        WHERE n.nspname = %(schema)s AND c.relname <> 'alembic_version'
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, replace(indexdef, %(schema)s || '.', '')
        FROM pg_indexes
        WHERE schemaname = %(schema)s AND tablename <> 'alembic_version'
        ORDER BY 1, 2""",
}


def test_catalog_matches_create_all(make_database: Callable[[], URL]) -> None:
    """What Alembic's comparison cannot see (partial index predicates, DESC, check constraints)
    is compared in PostgreSQL's own catalog: the revisions against ``metadata.create_all``."""
    url = make_database()
    eng = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        with eng.begin() as conn:
            migrations.upgrade(conn, "by_alembic")
            conn.execute(sa.text("CREATE SCHEMA by_metadata"))
            tables_for("by_metadata").metadata.create_all(conn)
    finally:
        eng.dispose()
    with psycopg.connect(libpq(url)) as conn:
        for name, query in _CATALOG.items():
            migrated = conn.execute(query, {"schema": "by_alembic"}).fetchall()
            described = conn.execute(query, {"schema": "by_metadata"}).fetchall()
            assert migrated, name
            assert migrated == described, name


def test_hot_table_storage_settings(engine: Engine) -> None:
    with engine.begin() as conn:
        migrations.upgrade(conn, "pgtq")
        options = conn.execute(
            sa.text("SELECT reloptions FROM pg_class WHERE oid = 'pgtq.jobs'::regclass")
        ).scalar_one()
    assert "fillfactor=90" in options
    assert "autovacuum_vacuum_scale_factor=0.01" in options


# -- running the revisions on their own -----------------------------------------------------------


def test_downgrade_to_base_then_upgrade_again(engine: Engine) -> None:
    with engine.begin() as conn:
        assert migrations.current(conn, "pgtq") == set()
        migrations.upgrade(conn, "pgtq")
    with engine.begin() as conn:
        assert migrations.current(conn, "pgtq") == HEADS
        migrations.downgrade(conn, "pgtq")
    with engine.begin() as conn:
        assert migrations.current(conn, "pgtq") == set()
        # The schema stays, holding only the version table.
        assert tables_in(conn, "pgtq") == {"alembic_version"}
        functions = conn.execute(
            sa.text("SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgtq'::regnamespace")
        ).scalar_one()
        assert functions == 0
        migrations.upgrade(conn, "pgtq")
    with engine.begin() as conn:
        assert migrations.current(conn, "pgtq") == HEADS
        assert tables_in(conn, "pgtq") == PGTQ_TABLES


def test_upgrade_leaves_the_callers_transaction_open(engine: Engine) -> None:
    with engine.connect() as conn:
        migrations.upgrade(conn, "pgtq")
        assert conn.in_transaction()
        conn.rollback()
        assert migrations.current(conn, "pgtq") == set()
        assert not sa.inspect(conn).has_schema("pgtq")


async def test_app_migrate_twice_is_a_no_op(side: Side, make_database: Callable[[], URL]) -> None:
    url = make_database()
    app = pgtq.App(url, schema="jobs_custom")
    try:
        await side.migrate(app)
        with psycopg.connect(libpq(url), autocommit=True) as conn:
            conn.execute("INSERT INTO jobs_custom.jobs (task_name) VALUES ('t')")
            oid = conn.execute("SELECT 'jobs_custom.jobs'::regclass::oid").fetchone()

        await side.migrate(app)

        with psycopg.connect(libpq(url), autocommit=True) as conn:
            assert conn.execute("SELECT 'jobs_custom.jobs'::regclass::oid").fetchone() == oid
            assert conn.execute("SELECT count(*) FROM jobs_custom.jobs").fetchone() == (1,)
            versions = conn.execute("SELECT version_num FROM jobs_custom.alembic_version")
            assert {v for (v,) in versions} == HEADS
            assert conn.execute("SELECT to_regclass('public.alembic_version')").fetchone() == (
                None,
            )
    finally:
        await app.close_async()


def test_concurrent_upgrades_wait_for_each_other(engine: Engine) -> None:
    """Every worker of a fleet may migrate at startup: the second waits, then has nothing to do."""
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))  # connected: both start upgrading at once
                barrier.wait()
                migrations.upgrade(conn, "pgtq")
                conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert errors == []
    with engine.connect() as conn:
        assert migrations.current(conn, "pgtq") == HEADS


def test_offline_sql_builds_the_same_schema(make_database: Callable[[], URL]) -> None:
    script = migrations.sql("jobs_custom")
    assert "CREATE TABLE jobs_custom.jobs" in script
    assert "INSERT INTO jobs_custom.alembic_version" in script
    url = make_database()
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute(script.encode())
    eng = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        with eng.begin() as conn:
            assert migrations.current(conn, "jobs_custom") == HEADS
            migrations.upgrade(conn, "jobs_custom")  # nothing left to do
            assert tables_in(conn, "jobs_custom") == PGTQ_TABLES
    finally:
        eng.dispose()


@pytest.mark.parametrize("schema", ["pgtq", "jobs_custom"])
async def test_defer_notifies_its_schemas_channel(side: Side, engine: Engine, schema: str) -> None:
    """pgtq's insert notifies by itself: pgtq_0006 dropped the insert trigger, so a row
    written with plain SQL announces nothing (polling finds it)."""
    with engine.begin() as conn:
        migrations.upgrade(conn, schema)
        triggers = conn.execute(
            sa.text("SELECT tgname FROM pg_trigger WHERE tgrelid = CAST(:t AS regclass)"),
            {"t": f"{schema}.jobs"},
        ).scalars()
        assert set(triggers) == {"jobs_history_updated"}
    app = pgtq.App(engine.url, schema=schema)

    @app.task(queue="emails")
    def send() -> None: ...

    dsn = libpq(engine.url)
    with (
        psycopg.connect(dsn, autocommit=True) as listener,
        psycopg.connect(dsn, autocommit=True) as writer,
    ):
        listener.execute(f"LISTEN {notify_channel(schema)}")
        # Notifications arrive in commit order: had this insert sent one, it would come first.
        writer.execute(f"INSERT INTO {schema}.jobs (queue, task_name) VALUES ('raw', 't')")
        await side.defer(send)
        payloads = [n.payload for n in listener.notifies(timeout=10, stop_after=1)]
    await app.close_async()
    app.close()
    assert [parse_announcement(p).queue for p in payloads] == ["emails"]


# -- inside a user's own Alembic project ----------------------------------------------------------

# What docs/migrations.md tells users to write (their MetaData is inline here, not imported).
USER_ENV_PY = """
from alembic import context
from sqlalchemy import Column, Integer, MetaData, Table, Text, engine_from_config, pool

import pgtq.migrations

# from myapp.models import metadata
metadata = MetaData()
Table("orders", metadata, Column("id", Integer, primary_key=True),
      Column("item", Text, nullable=False))

config = context.config
target_metadata = metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        include_schemas=True,
        include_object=pgtq.migrations.include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            include_schemas=True,
            include_object=pgtq.migrations.include_object,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
"""

USER_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "a1b2c3d4e5f6"
down_revision = None
branch_labels = ("app",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("item", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("orders")
"""


def make_user_project(root: Path, url: URL, pgtq_versions: str) -> Path:
    """An application's Alembic project with pgtq's revisions in ``version_locations``."""
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text(USER_ENV_PY)
    (root / "migrations" / "versions" / "a1b2c3d4e5f6_orders.py").write_text(USER_REVISION)
    sqlalchemy_url = url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    ini = root / "alembic.ini"
    ini.write_text(
        textwrap.dedent(
            f"""\
            [alembic]
            script_location = %(here)s/migrations
            path_separator = newline
            version_locations =
                %(here)s/migrations/versions
                {pgtq_versions}
            sqlalchemy.url = {sqlalchemy_url.replace("%", "%%")}
            """
        )
    )
    return ini


def user_tables(url: URL) -> tuple[set[str], set[str]]:
    with psycopg.connect(libpq(url)) as conn:
        tables = {
            f"{s}.{t}"
            for s, t in conn.execute(
                "SELECT schemaname, tablename FROM pg_tables "
                "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
            )
        }
        versions = {v for (v,) in conn.execute("SELECT version_num FROM public.alembic_version")}
    return tables, versions


@pytest.mark.parametrize("schema", [None, "jobs_custom"])
def test_user_project_upgrade_heads(
    tmp_path: Path,
    make_database: Callable[[], URL],
    monkeypatch: pytest.MonkeyPatch,
    schema: str | None,
) -> None:
    if schema is None:
        monkeypatch.delenv(migrations.SCHEMA_ENV, raising=False)
    else:
        monkeypatch.setenv(migrations.SCHEMA_ENV, schema)
    expected_schema = schema or "pgtq"
    url = make_database()
    cfg = Config(str(make_user_project(tmp_path, url, migrations.version_location())))

    alembic.command.upgrade(cfg, "heads")

    tables, versions = user_tables(url)
    assert {
        "public.orders",
        "public.alembic_version",
        f"{expected_schema}.jobs",
        f"{expected_schema}.workers",
    } <= tables
    # One version table, the application's, records both branches.
    assert f"{expected_schema}.alembic_version" not in tables
    assert versions == {"a1b2c3d4e5f6"} | HEADS
    # Autogenerate sees the application's tables and leaves pgtq's schema to pgtq.
    alembic.command.check(cfg)
    # pgtq's branch can be downgraded on its own.
    alembic.command.downgrade(cfg, "pgtq@base")
    tables, versions = user_tables(url)
    assert "public.orders" in tables
    assert f"{expected_schema}.jobs" not in tables
    assert versions == {"a1b2c3d4e5f6"}


def test_user_project_alembic_command_line(
    tmp_path: Path, make_database: Callable[[], URL]
) -> None:
    url = make_database()
    ini = make_user_project(tmp_path, url, migrations.version_location())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGTQ_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ini), "upgrade", "heads"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tables, versions = user_tables(url)
    assert {"public.orders", "pgtq.jobs", "pgtq.workers"} <= tables
    assert versions == {"a1b2c3d4e5f6"} | HEADS


def test_migrate_refuses_tables_managed_by_a_user_project(
    tmp_path: Path, make_database: Callable[[], URL], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(migrations.SCHEMA_ENV, raising=False)
    url = make_database()
    alembic.command.upgrade(
        Config(str(make_user_project(tmp_path, url, migrations.version_location()))), "heads"
    )
    app = pgtq.App(url)
    try:
        with pytest.raises(migrations.MigrationConflict, match="alembic upgrade heads"):
            app.migrate()
    finally:
        app.close()


def test_include_object_skips_pgtq_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(migrations.SCHEMA_ENV, raising=False)
    jobs = tables_for("pgtq").jobs
    other = sa.Table("orders", sa.MetaData(), sa.Column("id", sa.Integer))
    assert not migrations.include_object(jobs, "jobs", "table", False, None)
    assert migrations.include_object(other, "orders", "table", False, None)
    assert migrations.include_object(jobs.c.id, "id", "column", False, None)


# -- from an installed wheel ----------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    """No PYTHONPATH (the checkout must not be importable) and no pgtq settings."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PGTQ_")
    }


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_installed_wheel_migrates(tmp_path: Path, make_database: Callable[[], URL]) -> None:
    uv = shutil.which("uv")
    dist = tmp_path / "dist"
    if uv:
        _run(uv, "build", "--wheel", "--out-dir", dist, REPO_ROOT, cwd=tmp_path)
    else:
        _run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, REPO_ROOT, cwd=tmp_path)
    (wheel,) = dist.glob("pgtq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert fnmatch.filter(names, "pgtq/_alembic/versions/*.py")
    assert {"pgtq/py.typed", "pgtq/_alembic/env.py", "pgtq/_alembic/script.py.mako"} <= set(names)
    assert "pgtq/web/templates/base.html" in names  # the web dashboard's templates
    assert not [n for n in names if n.startswith("alembic/")]
    assert not [n for n in names if "__pycache__" in n]

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    if uv:
        _run(uv, "venv", "--quiet", "--python", sys.executable, venv, cwd=tmp_path)
        _run(uv, "pip", "install", "--quiet", "--python", python, wheel, cwd=tmp_path)
    else:
        _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
        _run(python, "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)

    found = _run(
        python,
        "-c",
        "import pgtq.migrations as m; assert m.VERSIONS_DIR.is_dir(); print(m.VERSIONS_DIR)",
        cwd=tmp_path,
    )
    assert Path(found.stdout.strip()).is_relative_to(venv)

    # Standalone: the command line, with pgtq's own version table.
    url = make_database()
    _run(venv / "bin" / "pgtq", "migrate", "--dsn", libpq(url), cwd=tmp_path)
    with psycopg.connect(libpq(url)) as conn:
        assert conn.execute("SELECT to_regclass('pgtq.jobs')").fetchone() == ("pgtq.jobs",)
        versions = {v for (v,) in conn.execute("SELECT version_num FROM pgtq.alembic_version")}
    assert versions == HEADS

    # Inside a user's project, naming the revisions as a package resource, as the docs say.
    url = make_database()
    ini = make_user_project(tmp_path / "project", url, "pgtq:_alembic/versions")
    _run(python, "-m", "alembic", "-c", ini, "upgrade", "heads", cwd=tmp_path / "project")
    tables, versions = user_tables(url)
    assert {"public.orders", "pgtq.jobs"} <= tables
    assert versions == {"a1b2c3d4e5f6"} | HEADS
