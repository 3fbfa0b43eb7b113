"""Fleet-wide limits: how many jobs a claim may take per task, per queue and per key of a
task. Pure, no I/O.

A limited claim runs under one transaction-level advisory lock, so the running counts and
rate buckets it reads cannot change under it: the worker reads them, :func:`allowances` (and
:func:`key_allowances` for ``key_rate_limit``) says how many jobs of each task, queue and
key it may start, the claim statement applies that (and the per-key caps, which it counts
itself), and the buckets are charged for what was taken.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(value: str | float | None) -> float | None:
    """``"100/s"``, ``"30/m"``, ``"5/h"`` or a number of jobs per second → jobs per second."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    else:
        match = _RATE.match(str(value))
        if not match:
            raise ValueError(f"invalid rate limit {value!r}: write e.g. '100/s', '30/m' or '5/h'")
        rate = float(match.group(1)) / _PER[match.group(2)]
    if rate <= 0:
        raise ValueError(f"invalid rate limit {value!r}: it must be above zero")
    return rate


@dataclass(frozen=True, slots=True)
class Limit:
    """The limits of one task or queue. ``rate`` in jobs started per second.

    A rate is a token bucket: it holds ``capacity`` starts and refills at ``rate`` a second.
    After an idle spell up to ``capacity`` jobs start at once, then one every ``1 / rate``
    seconds; any span of ``T`` seconds sees fewer than ``capacity + rate * T`` starts.
    ``burst`` sets the capacity; by default it is one second's worth of starts (at least one).
    ``burst=1`` spaces the starts evenly, so ``"5/s"`` then never starts more than 5 jobs in
    any one-second window (Celery's rate limits behave so).
    """

    concurrency: int | None = None
    rate: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.burst is not None:
            if isinstance(self.burst, bool) or not isinstance(self.burst, int):
                raise ValueError(f"burst must be a whole number of starts, got {self.burst!r}")
            if self.burst < 1:
                raise ValueError(f"burst must be at least 1, got {self.burst!r}")
            if self.rate is None:
                raise ValueError("burst applies to a rate_limit: set rate_limit too")

    @property
    def capacity(self) -> float:
        """The most starts the bucket holds: ``burst``, else one second's worth (at least 1)."""
        if self.burst is not None:
            return float(self.burst)
        return max(1.0, self.rate or 0.0)


def most_starts(limit: Limit, seconds: float) -> int:
    """The most jobs a rate limit lets start within any span of ``seconds`` (both ends
    included): the full bucket, and what refills while the span lasts."""
    assert limit.rate is not None
    return math.floor(limit.capacity + limit.rate * seconds + 1e-9)


def bucket_key(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def key_bucket(task: str, concurrency_key: str) -> str:
    """The bucket of a task's ``key_rate_limit`` for one ``concurrency_key``:
    ``key:<task>#<concurrency_key>``. Unambiguous: such a task's name has no ``#`` (checked
    by ``Task``), and the ``key:`` kind is apart from ``task:`` and ``queue:``. The limited
    claim builds the same text in SQL to find its allowance."""
    return f"key:{task}#{concurrency_key}"


def key_bucket_task(bucket: str) -> str:
    """The task a :func:`key_bucket` belongs to."""
    return bucket.removeprefix("key:").partition("#")[0]


def fresh_starts(limit: Limit) -> int:
    """Starts a bucket never seen (or full again) allows at once: its whole capacity."""
    return math.floor(limit.capacity + 1e-9)


def key_allowances(
    limits: Mapping[str, Limit], buckets: Mapping[str, tuple[float, float]]
) -> tuple[dict[str, int], list[str]]:
    """The key buckets of ``key_rate_limit`` tasks (``limits``: by task name) as the claim
    takes them: how many more jobs each key still charged may start now, and the buckets that
    have refilled to the full (a full bucket is one never seen: it is deleted, so the buckets
    of idle keys do not pile up). A key with no row starts :func:`fresh_starts` at once."""
    allowed: dict[str, int] = {}
    full: list[str] = []
    for key, (tokens, elapsed) in buckets.items():
        limit = limits.get(key_bucket_task(key))
        if limit is None:  # a task this worker does not have, or no longer key-limited
            continue
        now = refill(tokens, elapsed, limit)
        if now >= limit.capacity - 1e-9:
            full.append(key)
        else:
            allowed[key] = max(0, math.floor(now + 1e-9))
    return allowed, full


def refill(tokens: float | None, elapsed: float, limit: Limit) -> float:
    """Tokens in a bucket now; a bucket never seen starts full."""
    assert limit.rate is not None
    if tokens is None:
        return limit.capacity
    return min(limit.capacity, tokens + limit.rate * max(0.0, elapsed))


def allowances(
    limits: Mapping[str, Limit],
    running: Mapping[str, int],
    buckets: Mapping[str, tuple[float, float]],
) -> dict[str, int]:
    """How many more jobs each limited group (``task:x`` / ``queue:y``) may start now.

    ``running``: jobs ``doing`` per group; ``buckets``: (tokens, seconds since last charge).
    """
    allowed: dict[str, int] = {}
    for key, limit in limits.items():
        room = math.inf
        if limit.concurrency is not None:
            room = limit.concurrency - running.get(key, 0)
        if limit.rate is not None:
            tokens, elapsed = buckets.get(key, (None, 0.0))
            room = min(room, math.floor(refill(tokens, elapsed, limit) + 1e-9))
        allowed[key] = max(0, int(min(room, 1_000_000)))
    return allowed


def charges(
    limits: Mapping[str, Limit],
    buckets: Mapping[str, tuple[float, float]],
    taken: Iterable[str],
) -> dict[str, float]:
    """The tokens left in each rate-limited bucket after the claim took ``taken`` (group
    keys, one per job and group)."""
    counts: dict[str, int] = {}
    for key in taken:
        counts[key] = counts.get(key, 0) + 1
    left: dict[str, float] = {}
    for key, limit in limits.items():
        if limit.rate is None:
            continue
        tokens, elapsed = buckets.get(key, (None, 0.0))
        left[key] = refill(tokens, elapsed, limit) - counts.get(key, 0)
    return left
