"""The planner's statistics of the jobs table, kept fresh by the workers themselves.

The claim reads the oldest due jobs through the claim index and stops after a batch; the
planner takes that path only if it knows many jobs wait. Its statistics come from ANALYZE.
After a bulk insert into a table last analyzed while nearly empty (or never), it believes a
few rows wait and plans a bitmap scan that sorts every waiting job instead: measured here on
300,000 waiting jobs, 250 ms a claim before ANALYZE, 1 ms after; a 1,000,000-job backlog
drained at 330 jobs/s for its first tenth, 13,000 after (``benchmarks/scaling.py``, docs/
scaling.md). Autovacuum fixes it within its naptime (a minute by default) when it is on; a
worker does it within a heartbeat, on any server: at each beat it reads how many rows changed
since the last ANALYZE (catalog reads, no scan) and, past :func:`stale`'s threshold, one worker
of the fleet runs ``ANALYZE`` (a sample of 30,000 rows: milliseconds to a few hundred). It
never waits for, nor cancels, an autovacuum of the table: it gives up when the table's lock is
not free within 200 ms.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pgtq import statements
from pgtq.connectors import execute, sqlstate

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from pgtq.connectors import AsyncConnector

logger = logging.getLogger("pgtq.worker")

#: Rows changed since the last ANALYZE that make it stale, on top of :data:`STALE_FRACTION`
#: of the rows it counted.
STALE_ROWS = 1000
STALE_FRACTION = 0.1
LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout
#: An ANALYZE at most this often (seconds): on a busy table rows change faster than the
#: threshold every few seconds, and the plan does not need a fresher view than that.
MIN_INTERVAL = 30.0


def stale(changed: int, counted: float, seconds_since: float | None) -> bool:
    """Whether the jobs table needs an ANALYZE: never analyzed with rows changed since, or
    more changed than :data:`STALE_ROWS` plus :data:`STALE_FRACTION` of the rows counted then,
    and not analyzed in the last :data:`MIN_INTERVAL` seconds."""
    if seconds_since is not None and seconds_since < MIN_INTERVAL:
        return False
    return changed >= STALE_ROWS + STALE_FRACTION * max(counted, 0.0)


async def refresh(connector: AsyncConnector, s: statements.Statements) -> bool:
    """ANALYZE the jobs table if its statistics are :func:`stale` and no other worker is
    doing it; True if this call did. Never raises: a failure is one warning, and the next
    beat tries again."""
    try:
        found = await connector.run(statements.jobs_statistics(s))
        if found is None or not stale(*found):
            return False

        def analyze(conn: Connection) -> bool:
            if not execute(conn, statements.analyze_lock(s)):
                return False  # another worker is at it
            execute(conn, statements.analyze_wait(s))
            execute(conn, statements.analyze_jobs(s))
            return True

        done = await connector.run_in_transaction(analyze)
    except Exception as exc:
        if sqlstate(exc) == LOCK_NOT_AVAILABLE:
            return False  # a vacuum (or an ANALYZE of someone else's) has the table: it is seen to
        logger.warning("could not refresh the jobs table's statistics: %s", exc)
        return False
    if done:
        logger.info("analyzed the jobs table: %s rows changed since its statistics", found[0])
    return done
