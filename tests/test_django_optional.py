"""Django stays optional: pgtq, its command line and its web dashboard import without it, and
``pgtq.contrib.django`` itself imports nothing of Django until a name of it is used."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Django made unimportable (None in sys.modules), then everything a non-Django user imports.
SCRIPT = """
import sys
sys.modules["django"] = None
sys.modules["django_tasks"] = None
import pgtq, pgtq.cli, pgtq.testing, pgtq.contrib.django
assert not [m for m in sys.modules if m.startswith("django") and sys.modules[m] is not None]
try:
    pgtq.contrib.django.PgtqBackend
except ImportError:
    print("backend needs django")
"""


@pytest.mark.unit
def test_pgtq_imports_without_django() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "backend needs django"
