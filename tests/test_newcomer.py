"""The newcomer's path as the README gives it, on a wheel of pgtq installed in a throwaway
virtualenv: the README's virtualenv line, pip, ``pgtq --version``, ``pgtq migrate --dsn``, a
task file, a job deferred from Python and one from ``pgtq defer``, ``pgtq worker --one-shot``
and ``pgtq jobs list``. Nothing of the checkout is importable there (no PYTHONPATH, the work
directory a temporary one), so a file missing from the wheel or a dependency missing from
pyproject.toml fails here, as it would for a newcomer.

pip takes pgtq's dependencies from the package registry; where that is unreachable the test
skips, quoting pip.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.conftest import libpq, user_env

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

pytestmark = pytest.mark.slow

#: What pip or build print when the package registry cannot be reached (the test then skips).
OFFLINE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ProxyError",
)

TASKS = """\
import pgtq

app = pgtq.App()  # the database: PGTQ_DSN


@app.task(queue="greetings")
def greet(name: str) -> str:
    return f"hello {name}"
"""


def readme_venv_line() -> str:
    """The README's virtualenv line, which must come before its install command."""
    lines = README.read_text().splitlines()
    venv = next((i for i, line in enumerate(lines) if line.startswith("python -m venv ")), None)
    install = next((i for i, line in enumerate(lines) if line.startswith("pip install -e ")))
    assert venv is not None and venv < install, "README.md: `python -m venv ...` before the install"
    return lines[venv]


class Shell:
    """Runs a newcomer's commands with bash in their project directory, virtualenv active
    once it exists."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env

    def __call__(self, command: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """Run ``command``; fail unless it exits 0 (skip if pip found no registry)."""
        activate = ". .venv/bin/activate && " if (self.cwd / ".venv").exists() else ""
        done = subprocess.run(
            ["bash", "-c", activate + command],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        said = done.stdout + done.stderr
        if done.returncode != 0:
            offline = next((line for line in said.splitlines() if _is_offline(line)), None)
            if offline is not None:
                pytest.skip(f"the package registry is unreachable ({command!r}): {offline}")
            pytest.fail(f"{command!r} exited {done.returncode}:\n{said}")
        return done

    def out(self, command: str) -> str:
        """What ``command`` printed on stdout, stripped."""
        return self(command).stdout.strip()

    def said(self, command: str) -> str:
        """All ``command`` printed, stdout and stderr (its log lines)."""
        done = self(command)
        return done.stdout + done.stderr


def _is_offline(line: str) -> bool:
    return any(marker in line for marker in OFFLINE)


@pytest.mark.timeout(600)  # a build and a pip install from the registry: minutes at worst
def test_the_readme_path_on_an_installed_wheel(
    tmp_path: Path, make_database: Callable[[], URL]
) -> None:
    dist = tmp_path / "dist"
    project = tmp_path / "project"
    project.mkdir()
    url = libpq(make_database())  # empty: `pgtq migrate` creates the tables
    sh = Shell(project, user_env())

    build = [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)]
    sh(shlex.join(build), timeout=280)
    (wheel,) = dist.glob("pgtq-*.whl")
    sh(readme_venv_line())
    assert (project / ".venv" / "bin" / "activate").exists()
    sh(f"pip install --quiet {shlex.quote(str(wheel))}")
    assert sh.out("command -v pgtq") == str(project / ".venv" / "bin" / "pgtq")

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert sh.out("pgtq --version") == f"pgtq {version}"

    assert "is up to date" in sh.said(f"pgtq migrate --dsn {shlex.quote(url)}")
    (project / "newcomer_tasks.py").write_text(TASKS)
    sh.env["PGTQ_DSN"] = url  # from here on as the quickstart says: export PGTQ_DSN
    from_code = "from newcomer_tasks import greet; print(greet.defer(name='code'))"
    first = int(sh.out(f"python -c {shlex.quote(from_code)}"))
    said = sh.said("""pgtq defer newcomer_tasks:app greet '{"name": "shell"}'""")
    assert "Deferred greet as job" in said and "'greetings'" in said

    said = sh.said("pgtq worker newcomer_tasks:app --one-shot")
    assert "processed 2 job(s) (succeeded 2)" in said, said

    jobs = json.loads(sh.out("pgtq jobs list --json"))
    assert sorted((j["id"], j["status"], j["result"]) for j in jobs) == [
        (first, "succeeded", "hello code"),
        (first + 1, "succeeded", "hello shell"),
    ]
    assert "greet" in sh.out("pgtq jobs list")
