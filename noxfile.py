"""Sessions: `nox -s tests` (the suite), `lint` (ruff), `types` (mypy --strict), `bench`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import NamedTuple

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
    # pgtq.contrib.django (tests/django): Django 5.2 with the django-tasks backport on 3.11
    # (Django 6's django.tasks needs 3.12), Django 6 where it installs.
    "django>=5.2",
    "django-tasks>=0.8; python_version < '3.12'",
]

#: The browser the web dashboard's test drives (Playwright's own download is never used).
CHROMIUM = "/usr/bin/chromium"

#: Set (to anything but "" or "0") to keep `nox -s tests` inside its own virtualenv: the
#: Debian packages below are then not installed, and the tests that need them skip, naming
#: this variable.
NO_SYSTEM_INSTALL = "PGTQ_NO_SYSTEM_INSTALL"


class DebianPackage(NamedTuple):
    """A Debian package some tests need: the file it provides, which tests use it, and the
    service its install may start (stopped and disabled again: the tests start their own)."""

    name: str
    provides: str
    used_by: str
    service: str | None = None


#: The only things the tests install outside the session's virtualenv.
SYSTEM_PACKAGES = (
    DebianPackage("chromium", CHROMIUM, "the dashboard's browser test (tests/test_web_browser.py)"),
    DebianPackage(
        "pgbouncer",
        "/usr/sbin/pgbouncer",
        "the PgBouncer tests (tests/test_pgbouncer.py)",
        service="pgbouncer",
    ),
)


def _ensure_debian_packages(session: nox.Session, packages: Sequence[DebianPackage]) -> None:
    """Install the Debian packages that are missing, saying so first: they are the only things
    the tests install outside the session's virtualenv. ``PGTQ_NO_SYSTEM_INSTALL=1`` skips
    it; so does a machine without apt-get (or root, or password-less sudo). The tests that
    need a package then say why they skip; a failed install never fails the session (CI
    installs the packages itself). A service the install started (pgbouncer's, on port 6432)
    is stopped and disabled: the tests run their own, on a free port."""
    missing = [p for p in packages if not os.path.exists(p.provides)]
    if not missing:
        return
    names = " ".join(p.name for p in missing)
    users = "; ".join(f"{p.name}: {p.used_by}" for p in missing)
    if os.environ.get(NO_SYSTEM_INSTALL, "") not in ("", "0"):
        session.log(
            f"not installing Debian's {names} ({NO_SYSTEM_INSTALL} is set): these tests will "
            f"be skipped ({users})"
        )
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        session.log(
            f"{names} missing and cannot be installed here (no apt-get, or not root and no "
            f"sudo): these tests will be skipped ({users})"
        )
        return
    session.log(
        f"installing Debian's {names} system-wide for the tests ({users}); set "
        f"{NO_SYSTEM_INSTALL}=1 to skip it"
    )
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", *(p.name for p in missing)]
    for command in (["apt-get", "update", "-qq"], install):
        session.run(*sudo, *command, external=True, success_codes=range(256), env=env)
    for package in missing:
        if package.service:
            _stop_service(session, sudo, package.service)
        if not os.path.exists(package.provides):
            session.log(f"the install left no {package.provides}: {package.used_by} will skip")


def _stop_service(session: nox.Session, sudo: list[str], service: str) -> None:
    """Stop the service a package's install started (Debian's pgbouncer enables its unit and
    starts it where systemd runs), and keep it from starting at boot."""
    session.log(
        f"stopping and disabling the {service} service the package's install enabled (the "
        "tests start their own)"
    )
    if os.path.isdir("/run/systemd/system"):  # systemd is running
        commands = [["systemctl", "disable", "--now", service]]
    else:  # a container: invoke-rc.d may have started it; systemctl disables offline
        commands = [["service", service, "stop"]]
        if shutil.which("systemctl"):
            commands.append(["systemctl", "disable", service])
    for command in commands:
        session.run(*sudo, *command, external=True, success_codes=range(256))


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against real PostgreSQL (PGTQ_TEST_DSN, 127.0.0.1:5432, or pgserver)."""
    session.install("-e", ".[embedded,uvloop,prometheus,otel,web]", *TEST_DEPS)
    _ensure_debian_packages(session, SYSTEM_PACKAGES)
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
