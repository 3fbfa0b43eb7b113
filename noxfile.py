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
    # operations: the OTel SDK (in-memory spans), the dashboard's terminal emulator, the examples
    "opentelemetry-sdk>=1.20",
    "pyte>=0.8",
    "flask>=3.0",
    "fastapi>=0.110",
    "httpx>=0.27",
    "mypy>=1.11",  # the typing test of worker factories runs it
]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against real PostgreSQL (PGTQ_TEST_DSN, 127.0.0.1:5432, or pgserver)."""
    session.install("-e", ".[embedded,uvloop,prometheus,otel]", *TEST_DEPS)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "pgtq", "tests", "noxfile.py", "benchmarks", "alembic", "examples")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".[embedded,uvloop,prometheus,otel]", "mypy>=1.11")
    session.run("mypy", "--strict", "pgtq")


@nox.session
def bench(session: nox.Session) -> None:
    """The peer benchmark (benchmarks/README.md): `nox -s bench -- --quick`, or the full run.

    PgQueuer and Procrastinate are installed here only, never as pgtq's dependencies.
    """
    session.install("-e", ".[uvloop]", "pgqueuer==1.6.*", "procrastinate==3.10.*")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation (mkdocs-material, API reference from docstrings); warnings fail."""
    session.install("-e", ".[docs,prometheus,otel]", "ruff")
    site = session.posargs or ["--site-dir", f"{session.create_tmp()}/site"]
    session.run("mkdocs", "build", "--strict", *site)
