"""Idle workers answer a NOTIFY of new jobs by turns, not all at once (the thundering herd).

Every insert announces its jobs on the queue's channel. Were every idle worker of the queue to
claim at once, a job deferred to 100 idle workers would cost 100 claims, 99 of them empty
(`docs/scaling.md`). Instead the announcement names its jobs (``#<first id>:<count> <queue>``,
:func:`pgtq.statements.parse_announcement`), and each worker knows the live workers of the
queue from its heartbeat (the *roster*). The worker at turn 0 for that first id claims at once;
the one at turn *t* claims *t* times :data:`TURN` later, and after :data:`TURNS` turns every idle
worker left claims, unless a *taken* notice came first. The answering claim sends that notice
in its own statement (:meth:`pgtq.statements.Statements.answering`): "taken" when it
took every job the announcement named (or all that were claimable), or, when more may wait, the
plain announcement of the queue, which every idle worker answers at once (a burst drains on
the whole fleet).

Turns cost latency only when the worker whose turn it is cannot answer (busy, or not
listening): :data:`TURN` per such worker, then everyone. Correctness never depends on them:
claims stay atomic, a stale roster gives two workers one turn (one more claim) or a turn to
nobody (one more :data:`TURN`), and polling finds whatever a lost notice left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

#: Seconds between two turns: longer than a claim and its notice take on a busy machine, short
#: enough that a busy worker at turn 0 costs little pickup latency.
TURN = 0.010
#: After this many turns without a taken notice, every idle worker of the queue claims.
TURNS = 3

#: Live workers: their ids and the queues they serve (None: every queue).
Roster = Sequence[tuple[str, Sequence[str] | None]]


@dataclass(frozen=True, slots=True)
class Answer:
    """What an answering claim tells the others: the announcements it answers (their first
    ids), how many jobs they named, and the queue to announce again if more may wait."""

    tokens: tuple[int, ...]
    count: int
    queue: str

    def merge(self, other: Answer) -> Answer:
        return Answer(self.tokens + other.tokens, self.count + other.count, self.queue)

    @property
    def payload(self) -> str:
        """The taken notice's payload: the first ids answered, space-separated."""
        return " ".join(map(str, self.tokens))


def turn(roster: Roster, me: str, queue: str, token: int) -> int:
    """This worker's turn (0: at once) for the announcement of ``queue`` whose first job id is
    ``token``: workers of the queue ordered by id, the first turn at ``token`` modulo their
    number, so successive announcements start at successive workers."""
    members = sorted({wid for wid, queues in roster if queues is None or queue in queues} | {me})
    return (members.index(me) - token) % len(members)


def parse_taken(payload: str) -> list[int]:
    """The first ids a taken notice answers (anything else in it is ignored)."""
    return [int(part) for part in payload.split() if part.isdigit()]


class Turns:
    """One worker's turns: when to answer an announcement, and the turns taken meanwhile."""

    def __init__(
        self,
        me: Callable[[], str],
        answer: Callable[[Answer], None],
        *,
        turn_seconds: float = TURN,
        turns: int = TURNS,
    ) -> None:
        self._me = me
        self._answer = answer  # the fetcher: claim now, telling the others
        self._turn_seconds = turn_seconds
        self._turns = turns
        self.roster: Roster = ()
        self._waiting: dict[int, asyncio.TimerHandle] = {}

    def heard(self, queue: str, token: int, count: int) -> None:
        """An announcement of ``count`` jobs from id ``token`` on ``queue``: answer at once,
        or at this worker's turn unless another worker took them first."""
        answer = Answer((token,), count, queue)
        t = min(turn(self.roster, self._me(), queue, token), self._turns)
        if t == 0:
            self._answer(answer)
            return
        if token in self._waiting:
            return
        loop = asyncio.get_running_loop()
        self._waiting[token] = loop.call_later(t * self._turn_seconds, self._due, answer)

    def taken(self, tokens: Iterable[int]) -> None:
        """Another worker answered these announcements: drop this worker's turns for them."""
        for token in tokens:
            handle = self._waiting.pop(token, None)
            if handle is not None:
                handle.cancel()

    def _due(self, answer: Answer) -> None:
        self._waiting.pop(answer.tokens[0], None)
        self._answer(answer)

    def close(self) -> None:
        for handle in self._waiting.values():
            handle.cancel()
        self._waiting.clear()
