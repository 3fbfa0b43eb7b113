"""Tasks for ``pgtq worker --processes N`` tests (tests/test_supervisor.py): jobs that show
which process ran them and that hold a worker until the test lets them go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pgtq

app = pgtq.App()  # the database comes from PGTQ_DSN / --dsn

#: How long a held job waits for its gate before it gives up (a test's deadline).
HOLD_LIMIT = 60.0


@app.task()
def meet(rendezvous: str, expected: int) -> int:
    """Leave this process's pid in ``rendezvous`` and wait until ``expected`` processes have:
    with ``--concurrency 1`` each holds one job, so every process must take one."""
    directory = Path(rendezvous)
    (directory / str(os.getpid())).touch()
    deadline = time.monotonic() + HOLD_LIMIT
    while len(list(directory.iterdir())) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@app.task()
def hold(gate: str) -> int:
    """Run until the file ``gate`` exists; the pid of the process that ran it."""
    deadline = time.monotonic() + HOLD_LIMIT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@app.task()
def pid() -> int:
    return os.getpid()
