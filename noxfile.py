"""Sessions: `nox -s tests` (the suite), `lint` (ruff), `types` (mypy --strict), `bench`."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint", "types"]
nox.options.reuse_venv = "yes"

TEST_DEPS = [
    "pytest>=8",
    "pytest-asyncio>=0.24",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "build>=1.2",
]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against real PostgreSQL (PGTQ_TEST_DSN, 127.0.0.1:5432, or pgserver)."""
    session.install("-e", ".[embedded,uvloop]", *TEST_DEPS)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "pgtq", "tests", "noxfile.py", "benchmarks", "alembic")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".[embedded,uvloop]", "mypy>=1.11")
    session.run("mypy", "--strict", "pgtq")
