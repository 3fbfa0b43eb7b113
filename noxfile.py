"""Sessions: `nox -s tests` (the suite), `lint` (ruff), `types` (mypy --strict), `bench`."""

from __future__ import annotations

import os
import shutil

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
    "playwright>=1.40",  # the web dashboard's browser test, driving Debian's Chromium
]

#: The browser the web dashboard's test drives (Playwright's own download is never used).
CHROMIUM = "/usr/bin/chromium"

#: Set (to anything but "" or "0") to keep `nox -s tests` inside its own virtualenv: Debian's
#: chromium is then not installed, and tests/test_web_browser.py skips, naming this variable.
NO_SYSTEM_INSTALL = "PGTQ_NO_SYSTEM_INSTALL"


def _ensure_chromium(session: nox.Session) -> None:
    """Install Debian's chromium when it is missing, saying so first: it is the one thing the
    tests install outside the session's virtualenv. ``PGTQ_NO_SYSTEM_INSTALL=1`` skips it; so
    does a machine without apt-get (or root, or password-less sudo). The browser test then says
    why it skips; a failed install never fails the session (CI installs chromium itself)."""
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get(NO_SYSTEM_INSTALL, "") not in ("", "0"):
        session.log(
            f"not installing Debian's chromium ({NO_SYSTEM_INSTALL} is set): the dashboard's "
            "browser test (tests/test_web_browser.py) will be skipped"
        )
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        session.log(
            "chromium is missing and cannot be installed here (no apt-get, or not root and no "
            "sudo): the dashboard's browser test (tests/test_web_browser.py) will be skipped"
        )
        return
    session.log(
        "installing Debian's chromium system-wide for the dashboard's browser test "
        f"(tests/test_web_browser.py); set {NO_SYSTEM_INSTALL}=1 to skip it"
    )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        session.run(*sudo, *command, external=True, success_codes=range(256), env=env)
    if not os.path.exists(CHROMIUM):
        session.log(f"the install left no {CHROMIUM}: the browser test will be skipped")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against real PostgreSQL (PGTQ_TEST_DSN, 127.0.0.1:5432, or pgserver)."""
    session.install("-e", ".[embedded,uvloop,prometheus,otel,web]", *TEST_DEPS)
    _ensure_chromium(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def unit(session: nox.Session) -> None:
    """The tests marked ``unit`` (the pure parts, the import layering): no PostgreSQL needed,
    a few seconds. Every module is still imported, so the test dependencies are the suite's."""
    session.install("-e", ".[embedded,uvloop,prometheus,otel,web]", *TEST_DEPS)
    session.run("pytest", "-m", "unit", *(session.posargs or ["-q"]))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the layer rules of docs/architecture.md (import-linter, pyproject.toml)."""
    session.install("ruff>=0.6", "import-linter>=2.0")
    session.run("ruff", "check", "pgtq", "tests", "noxfile.py", "benchmarks", "alembic", "examples")
    session.run("lint-imports")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".[embedded,uvloop,prometheus,otel,web]", "mypy>=1.11")
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
    session.install("-e", ".[docs,prometheus,otel,web]", "ruff")
    site = session.posargs or ["--site-dir", f"{session.create_tmp()}/site"]
    session.run("mkdocs", "build", "--strict", *site)
