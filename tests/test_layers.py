"""Layer rules import-linter cannot state (it counts imports inside functions too), checked
in a fresh interpreter: importing the API loads no worker. The other rules are
import-linter contracts in ``pyproject.toml`` (``nox -s lint``); docs/architecture.md lists
which check holds each."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

#: The API's modules. ``import pgtq`` imports all of them, so one fresh interpreter checks all.
API = ("pgtq", "pgtq.app", "pgtq.tasks", "pgtq.jobs")
#: What the API imports only inside the methods that need it.
LAZY = ("pgtq.worker", "pgtq.periodic")


def test_the_api_does_not_import_the_worker_at_module_level() -> None:
    check = (
        f"import sys, {', '.join(API)}\n"
        f"loaded = sorted(m for m in {LAZY!r} if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"importing the API loads {done.stderr.strip().splitlines()[-1]}"
