"""The in-process twin of ``pgtq worker benchmarks.apps:app --one-shot --concurrency N``.

    python -m benchmarks.inprocess DSN CONCURRENCY

Imports the same app, points it at DSN and drains the queue with
``app.run_worker(concurrency=N, wait=False)`` in this process (what the other burn-down
figures measure, but as a whole process: the driver times this process from its start to its
exit, exactly as it times the command). Prints one JSON line: the jobs processed, the seconds
spent importing (``import_s``) and inside ``run_worker`` (``worker_s``), and where pgtq was
imported from.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    dsn, concurrency = sys.argv[1], int(sys.argv[2])
    began = time.perf_counter()
    import pgtq
    from benchmarks.apps import app

    app.use_dsn(dsn)
    imported = time.perf_counter()
    stats = app.run_worker(concurrency=concurrency, wait=False)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "processed": stats.processed,
                "import_s": imported - began,
                "worker_s": done - imported,
                "pgtq": pgtq.__file__,
            }
        )
    )


if __name__ == "__main__":
    main()
