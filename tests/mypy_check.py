"""Run ``mypy --strict`` on a usage file of tests/typing/, as a user's project would.

A usage file type-checks with a ``type: ignore[code]`` on each call that must be rejected:
--strict reports an ignore that is not needed, so a clean run proves each was rejected.
:func:`errors_without_ignores` strips them and returns what mypy then says, line by line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TYPING = ROOT / "tests" / "typing"


def mypy(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
         "--cache-dir", str(ROOT / ".mypy_cache"), str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip


def errors_without_ignores(usage: Path, tmp_path: Path) -> list[str]:
    """mypy's errors on ``usage`` with its ``type: ignore`` comments removed."""
    bare = tmp_path / f"{usage.stem}_bare.py"
    bare.write_text(re.sub(r"  # type: ignore\[[a-z-]+\]", "", usage.read_text()))
    failed = mypy(bare)
    assert failed.returncode == 1, failed.stdout
    return [line for line in failed.stdout.splitlines() if ": error:" in line]
