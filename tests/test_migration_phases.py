"""Pre and post revisions: ``upgrade(phase=...)``, ``pgtq migrate --pre/--post``, and the same
in a user's Alembic project (``pre_target``).

The mechanism is tested on a temporary versions directory: copies of pgtq's revisions (its
only post one so far, pgtq_0006, applied first) plus synthetic ones (a pre revision adding a
column, a post one dropping it). The real ``alembic/versions`` is left alone.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import alembic.command
import psycopg
import pytest
import sqlalchemy as sa
from alembic.config import Config
from sqlalchemy.engine import URL, Engine
from typer.testing import CliRunner

import pgtq
from pgtq import migrations
from pgtq.cli import cli
from tests.conftest import libpq
from tests.sides import Side
from tests.test_migrations import make_user_project

#: pgtq's own revisions, oldest first; the synthetic ones below stack on the newest.
REAL_REVISIONS = [r.revision for r in reversed(list(migrations._script().walk_revisions()))]
REAL_HEAD = REAL_REVISIONS[-1]

SYNTHETIC = {
    "syn_0005": ("pre", "op.add_column('jobs', sa.Column('note', sa.Text()), schema=schema)",
                  "op.drop_column('jobs', 'note', schema=schema)"),
    "syn_0006": ("post", "op.drop_column('jobs', 'note', schema=schema)",
                  "op.add_column('jobs', sa.Column('note', sa.Text()), schema=schema)"),
    "syn_0007": ("pre", "op.add_column('jobs', sa.Column('label', sa.Text()), schema=schema)",
                  "op.drop_column('jobs', 'label', schema=schema)"),
}  # fmt: skip


def write_revision(directory: Path, revision: str, down: str) -> None:
    phase, upgrade, downgrade = SYNTHETIC[revision]
    (directory / f"{revision}_synthetic.py").write_text(
        textwrap.dedent(
            f'''\
            """Synthetic {phase} revision for the tests."""
            import sqlalchemy as sa
            from alembic import op

            from pgtq.migrations import revision_schema

            revision = {revision!r}
            down_revision = {down!r}
            branch_labels = None
            depends_on = None
            phase = {phase!r}


            def upgrade() -> None:
                schema = revision_schema()
                {upgrade}


            def downgrade() -> None:
                schema = revision_schema()
                {downgrade}
            '''
        )
    )


@pytest.fixture
def versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """``versions("syn_0005", "syn_0006")``: pgtq's revisions plus those synthetic ones, made
    the revisions pgtq runs for this test."""

    def make(*extra: str) -> Path:
        directory = tmp_path / "versions"
        shutil.copytree(migrations.VERSIONS_DIR, directory, ignore=shutil.ignore_patterns("__*"))
        down = REAL_HEAD
        for revision in extra:
            write_revision(directory, revision, down)
            down = revision
        monkeypatch.setattr(migrations, "VERSIONS_DIR", directory)
        return directory

    return make


@pytest.fixture
def engine(make_database: Callable[[], URL]) -> Iterator[Engine]:
    eng = sa.create_engine(
        make_database().set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool
    )
    yield eng
    eng.dispose()


def columns(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return {c["name"] for c in sa.inspect(conn).get_columns("jobs", schema="pgtq")}


def at(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return migrations.current(conn, "pgtq")


def upgrade(engine: Engine, **kwargs: object) -> list[str]:
    with engine.begin() as conn:
        return migrations.upgrade(conn, "pgtq", **kwargs)  # type: ignore[arg-type]


# -- the markers ----------------------------------------------------------------------------------


def test_every_pgtq_revision_says_its_phase() -> None:
    script = migrations._script()
    revisions = list(script.walk_revisions())
    assert revisions
    for rev in revisions:
        assert migrations.phase_of(rev) in ("pre", "post"), rev.path
    # One revision removes what the previous release used: the insert trigger (pgtq_0006).
    post = {rev.revision for rev in revisions if migrations.phase_of(rev) == "post"}
    assert post == {"pgtq_0006"}


def test_a_revision_without_a_phase_is_refused(versions: Callable[..., Path]) -> None:
    directory = versions("syn_0005")
    path = directory / "syn_0005_synthetic.py"
    path.write_text(path.read_text().replace("phase = 'pre'", ""))
    [rev] = [r for r in migrations._script().walk_revisions() if r.revision == "syn_0005"]
    with pytest.raises(pgtq.ConfigurationError, match='phase = "pre"'):
        migrations.phase_of(rev)


# -- upgrade(phase=...) ---------------------------------------------------------------------------


async def test_pre_then_post_on_a_schema_of_the_previous_release(
    side: Side, versions: Callable[..., Path], make_database: Callable[[], URL]
) -> None:
    versions("syn_0005", "syn_0006")
    url = make_database()
    app = pgtq.App(url)
    eng = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        assert upgrade(eng, revision=REAL_HEAD) == REAL_REVISIONS
        with eng.connect() as conn:
            assert migrations.pending(conn, "pgtq") == [("syn_0005", "pre"), ("syn_0006", "post")]

        assert await side.call(app, "migrate", phase="pre") == ["syn_0005"]
        assert at(eng) == {"syn_0005"} and "note" in columns(eng)
        assert await side.call(app, "migrate", phase="pre") == []  # nothing left for pre
        with eng.connect() as conn:
            assert migrations.pending(conn, "pgtq") == [("syn_0006", "post")]

        assert await side.call(app, "migrate", phase="post") == ["syn_0006"]
        assert at(eng) == {"syn_0006"} and "note" not in columns(eng)
        assert await side.call(app, "migrate") == []
    finally:
        await app.close_async()
        eng.dispose()


def test_on_an_empty_schema_pre_applies_every_revision(
    versions: Callable[..., Path], engine: Engine
) -> None:
    # No worker of any release runs on a schema that does not exist yet: pre applies the post
    # revision pgtq_0006 too, else the pre revision after it (pgtq_0007) would be out of reach
    # and a fresh deployment's `migrate --pre` would leave its new workers behind.
    assert REAL_REVISIONS.index("pgtq_0006") < REAL_REVISIONS.index("pgtq_0007")
    assert upgrade(engine, phase="pre") == REAL_REVISIONS
    assert at(engine) == {REAL_HEAD}
    assert upgrade(engine, phase="post") == []


def test_pre_on_the_release_before_pgtq_0006_names_its_pending_post_revision(
    engine: Engine,
) -> None:
    # A schema of the release before pgtq_0006's: its post revision stands before pgtq_0007.
    upgrade(engine, revision="pgtq_0005")
    with pytest.raises(migrations.MigrationPhaseError, match=r"pgtq_0006.*pgtq_0007"):
        upgrade(engine, phase="pre")
    assert at(engine) == {"pgtq_0005"}
    assert upgrade(engine, phase="post") == REAL_REVISIONS[REAL_REVISIONS.index("pgtq_0006") :]


def test_plain_upgrade_applies_both_phases(versions: Callable[..., Path], engine: Engine) -> None:
    versions("syn_0005", "syn_0006")
    upgrade(engine, revision=REAL_HEAD)
    assert upgrade(engine) == ["syn_0005", "syn_0006"]
    assert at(engine) == migrations.heads() == {"syn_0006"}


def test_pre_refuses_a_post_revision_standing_before_a_pre_one(
    versions: Callable[..., Path], engine: Engine
) -> None:
    versions("syn_0005", "syn_0006", "syn_0007")
    upgrade(engine, revision="syn_0005")
    with pytest.raises(migrations.MigrationPhaseError, match=r"syn_0006.*syn_0007"):
        upgrade(engine, phase="pre")
    assert at(engine) == {"syn_0005"}  # nothing applied
    assert upgrade(engine, phase="post") == ["syn_0006", "syn_0007"]


def test_a_schema_migrated_by_a_newer_release_is_named(
    versions: Callable[..., Path], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = migrations.VERSIONS_DIR
    versions("syn_0005")
    upgrade(engine)
    monkeypatch.setattr(migrations, "VERSIONS_DIR", real)  # this release knows no syn_0005
    with pytest.raises(migrations.MigrationConflict, match=r"syn_0005.*newer release"):
        upgrade(engine, phase="pre")


def test_a_phase_and_a_revision_together_are_refused(engine: Engine) -> None:
    with pytest.raises(pgtq.ConfigurationError, match="not both"):
        upgrade(engine, revision=REAL_HEAD, phase="pre")
    with pytest.raises(pgtq.ConfigurationError, match="phase must be"):
        upgrade(engine, phase="later")


# -- the command line -----------------------------------------------------------------------------


def test_pgtq_migrate_pre_and_post(versions: Callable[..., Path], engine: Engine) -> None:
    versions("syn_0005", "syn_0006")
    upgrade(engine, revision=REAL_HEAD)
    dsn = engine.url.render_as_string(hide_password=False)

    def pgtq_migrate(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli, ["migrate", *args], env={"PGTQ_DSN": dsn})
        return result.exit_code, " ".join(result.output.split())

    code, output = pgtq_migrate("--check", "--pre")
    assert code == 1 and "pre revisions pending (syn_0005)" in output
    code, output = pgtq_migrate("--pre")
    assert code == 0, output
    assert "applied syn_0005" in output and "still pending: syn_0006 (post)" in output
    assert "pgtq migrate --post" in output
    code, output = pgtq_migrate("--check", "--pre")
    assert code == 0 and "post pending: syn_0006" in output
    assert pgtq_migrate("--check")[0] == 1  # not at head yet
    code, output = pgtq_migrate("--post")
    assert code == 0 and "up to date (applied syn_0006)" in output
    assert pgtq_migrate("--check")[0] == 0
    code, output = pgtq_migrate("--pre", "--post")
    assert code == 1 and "not both" in output
    code, output = pgtq_migrate("--sql", "--pre")
    assert code == 1 and "no phase" in output


# -- inside a user's Alembic project --------------------------------------------------------------


def test_pre_target_in_a_user_project(
    versions: Callable[..., Path], tmp_path: Path, make_database: Callable[[], URL]
) -> None:
    directory = versions("syn_0005", "syn_0006")
    url = make_database()
    ini = make_user_project(tmp_path / "project", url, str(directory))
    cfg = Config(str(ini))
    alembic.command.upgrade(cfg, f"pgtq@{REAL_HEAD}")  # the previous release
    alembic.command.upgrade(cfg, "app@head")

    # Pre: what the docs tell users to run before the new release starts.
    target = migrations.pre_target(ini)
    assert target == "syn_0005"
    alembic.command.upgrade(cfg, target)
    with psycopg.connect(libpq(url)) as conn:
        versions_found = {v for (v,) in conn.execute("SELECT version_num FROM alembic_version")}
        cols = {
            c
            for (c,) in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'pgtq' AND table_name = 'jobs'"
            )
        }
    assert versions_found == {"a1b2c3d4e5f6", "syn_0005"}
    assert "note" in cols
    assert migrations.pre_target(cfg) == "syn_0005"  # again: nothing more (a no-op target)

    # Post: plain `alembic upgrade heads`.
    alembic.command.upgrade(cfg, "heads")
    eng = sa.create_engine(url.set(drivername="postgresql+psycopg"), poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            assert migrations.pre_target(cfg, conn) == "syn_0006"
            assert "note" not in {
                c["name"] for c in sa.inspect(conn).get_columns("jobs", schema="pgtq")
            }
    finally:
        eng.dispose()


def test_pre_target_on_an_empty_project_database(
    tmp_path: Path, make_database: Callable[[], URL]
) -> None:
    # pgtq's own revisions only, none applied: every one is pre (see
    # test_on_an_empty_schema_pre_applies_every_revision).
    ini = make_user_project(tmp_path / "project", make_database(), str(migrations.VERSIONS_DIR))
    assert migrations.pre_target(ini) == REAL_HEAD
