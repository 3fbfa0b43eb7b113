"""Idle workers answer a NOTIFY of new jobs by turns, not all at once (the thundering herd).

Every insert announces its jobs on the jobs' channel. Were every idle worker of the queue to
claim at once, a job deferred to 100 idle workers would cost 100 claims, 99 of them empty.
Instead the announcement names its jobs (``#<first id>:<count> <queue>``,
:func:`pgtq.statements.parse_announcement`), each worker knows the registered workers of the
queue from its heartbeat (the *roster*), and only the worker whose turn it is claims: the
first id modulo their number, so successive announcements go to successive workers.

No "taken" notice: PostgreSQL 15 wakes every listening backend of the database for every
NOTIFY, whatever its channel, and that wake-up of 100 backends costs the server more than
100 empty claims (measured: docs/scaling.md). So the others never hear whether the job was
taken, and do not need to:

- the worker whose turn it is and has no room passes the turn on: it announces the queue
  again in the bare form, which every idle worker answers at once (the herd, but only then);
- when its claim comes back full and the announcement named more jobs than it asked for,
  the claim itself announces the queue in the bare form (a burst drains on the whole fleet);
- a turn that falls to a worker that died (its row stays until it is rescued) or does not
  listen is found by the fleet's polling: each worker polls every
  ``fetch_job_polling_interval``, so N workers look every interval / N on average.

With fewer than :data:`MIN_FLEET` workers on the queue, every worker answers every
announcement: a few empty claims cost less than a job left to polling.

Correctness never depends on turns: claims stay atomic (``SKIP LOCKED``), and a stale roster
gives a turn to two workers (one more claim) or, for a worker the others do not know yet, to
one they know.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Turns apply from this many registered workers of a queue; below it, everyone answers.
MIN_FLEET = 4

#: Registered workers: their ids and the queues they serve (None: every queue).
Roster = Sequence[tuple[str, Sequence[str] | None]]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the answering claim needs: how many jobs the announcements it answers named, and
    their queue, announced again (bare) when it came back full and more may wait."""

    jobs: int
    queue: str

    def merge(self, other: Answer) -> Answer:
        return Answer(self.jobs + other.jobs, self.queue)


def whose_turn(roster: Roster, me: str, queue: str, first: int) -> str | None:
    """The worker whose turn it is to claim the announcement of ``queue`` whose first job id
    is ``first``; None when everyone answers (fewer than :data:`MIN_FLEET` workers)."""
    members = sorted({wid for wid, queues in roster if queues is None or queue in queues} | {me})
    if len(members) < MIN_FLEET:
        return None
    return members[first % len(members)]
