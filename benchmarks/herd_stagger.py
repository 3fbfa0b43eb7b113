"""A PROTOTYPE, in the benchmark only (pgtq is not changed): idle workers answer a NOTIFY of new
jobs one at a time, by rank, instead of all at once (issue 20, the thundering herd).

    python -m benchmarks.run --fleet --figures herd --herd-variants plain,stagger

What it does, in each herd process (``benchmarks.fleet_app herd ... BASE TOTAL DELTA_MS``):

- Every worker has a rank 0..TOTAL-1 (here given by the driver; a real design would read it
  off the workers table at each heartbeat). Each counts the job NOTIFYs it hears (all hear the
  same ones in the same order: PostgreSQL delivers a channel's notifications in commit order),
  and for the ``seq``-th one its turn is ``(rank - seq) mod TOTAL``: the first responder
  rotates, so the jobs spread over the fleet.
- Turn 0 claims at once (pgtq's own ``Fetcher.announce``). Turn ``t`` claims after
  ``t * DELTA_MS`` unless a *taken* notice for that NOTIFY arrived meanwhile.
- A worker whose claim (made for NOTIFY ``seq``) got jobs sends ``NOTIFY pgtq_herd_taken,
  '<seq>'``; each worker LISTENs for it on a connection of its own (as a real design would
  on its LISTEN connection: one more notification forwarded per listener and pickup).

Monkeypatches ``Listener.on_notify`` and ``Claims.claim``: private internals that may change.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

TAKEN = "pgtq_herd_taken"


@dataclass
class _Turns:
    rank: int
    seq: int = 0
    answering: int | None = None  # the NOTIFY this worker's next claim answers
    taken: int = 0  # the highest NOTIFY another worker has taken
    pending: dict[int, asyncio.TimerHandle] = field(default_factory=dict)


class Stagger:
    def __init__(self, dsn: str, base: int, total: int, delta_ms: float) -> None:
        self.dsn = dsn.replace("postgresql+asyncpg://", "postgresql://")
        self.base, self.total, self.delta = base, total, delta_ms / 1000
        self.turns: dict[str, _Turns] = {}
        self.conns: list[Any] = []
        self.sender: Any = None
        self.lock = asyncio.Lock()
        self.sends: set[asyncio.Task[None]] = set()

    async def open(self, worker_ids: list[str]) -> None:
        import asyncpg

        self.sender = await asyncpg.connect(self.dsn)
        for i, worker_id in enumerate(worker_ids):
            turns = self.turns[worker_id] = _Turns(rank=self.base + i)
            conn = await asyncpg.connect(self.dsn)
            await conn.add_listener(TAKEN, self._on_taken(turns))
            self.conns.append(conn)

    async def close(self) -> None:
        for conn in [*self.conns, self.sender]:
            with contextlib.suppress(Exception):
                await conn.close()

    def _on_taken(self, turns: _Turns) -> Any:
        def heard(conn: Any, pid: int, channel: str, payload: str) -> None:
            seq = int(payload)
            turns.taken = max(turns.taken, seq)
            for s in [s for s in turns.pending if s <= seq]:
                turns.pending.pop(s).cancel()

        return heard

    def install(self) -> None:
        from pgtq import statements
        from pgtq.claims import Claims
        from pgtq.listener import Listener

        on_notify, claim = Listener.on_notify, Claims.claim
        stagger = self

        def staggered(listener: Listener, channel: str, payload: str) -> None:
            s = listener._s
            turns = stagger.turns.get(listener._scope.worker_id())
            if turns is None or channel != s.channel:
                return on_notify(listener, channel, payload)
            if statements.parse_announcement(payload)[1] is not None:
                return on_notify(listener, channel, payload)  # due later: as before
            turns.seq += 1
            seq = turns.seq
            turn = (turns.rank - seq) % stagger.total
            if turn == 0:
                turns.answering = seq
                return on_notify(listener, channel, payload)

            def fire() -> None:
                turns.pending.pop(seq, None)
                if turns.taken < seq:
                    turns.answering = seq
                    on_notify(listener, channel, payload)

            loop = asyncio.get_running_loop()
            turns.pending[seq] = loop.call_later(stagger.delta * turn, fire)
            return None

        async def claiming(self: Claims, limit: int) -> Any:
            got = await claim(self, limit)
            turns = stagger.turns.get(self._worker_id())
            if got and turns is not None and turns.answering is not None:
                seq, turns.answering = turns.answering, None
                task = asyncio.get_running_loop().create_task(stagger._send(seq))
                stagger.sends.add(task)
                task.add_done_callback(stagger.sends.discard)
            return got

        Listener.on_notify = staggered  # type: ignore[method-assign]
        Claims.claim = claiming  # type: ignore[method-assign]

    async def _send(self, seq: int) -> None:
        async with self.lock:
            await self.sender.execute("SELECT pg_notify($1, $2)", TAKEN, str(seq))
