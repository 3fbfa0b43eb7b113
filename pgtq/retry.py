"""When a failed attempt is tried again: a pure policy, no I/O."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Backoff = Literal["exponential", "linear", "fixed"]


@dataclass(frozen=True)
class Retry:
    """How many attempts a job gets and how long to wait between them.

    ``max_attempts`` counts the first run: ``Retry(max_attempts=3)`` runs a job at most three
    times. ``jitter`` is a fraction of the delay added at random, so a fleet of failing jobs
    does not come back in one burst. ``max_delay`` bounds the delay actually waited, jitter
    included: once the backoff reaches it, the jitter spreads the retries below it (down to
    ``max_delay / (1 + jitter)``) rather than past it.
    """

    max_attempts: int = 3
    backoff: Backoff = "exponential"
    base: float = 1.0
    max_delay: float = 3600.0
    jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("Retry(max_attempts=...) must be at least 1")
        if self.backoff not in ("exponential", "linear", "fixed"):
            raise ValueError(f"unknown backoff {self.backoff!r}: use exponential, linear or fixed")
        if self.base < 0 or self.max_delay < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("Retry: base and max_delay must be >= 0, jitter within [0, 1]")

    def delay(
        self, attempt: int, exc: BaseException, rand: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds before the next attempt, or None when ``attempt`` was the last one."""
        if attempt >= self.max_attempts or not isinstance(exc, self.retry_on):
            return None
        if self.backoff == "exponential":
            raw = self.base * 2.0 ** (attempt - 1)
        elif self.backoff == "linear":
            raw = self.base * attempt
        else:
            raw = self.base
        # Jitter first, then the cap: the cap is a promise about the wait itself. At the cap
        # the jittered range is scaled under it, so retries stay spread out there too.
        low = min(raw, self.max_delay / (1.0 + self.jitter))
        return min(self.max_delay, low + low * self.jitter * rand())


NO_RETRY = Retry(max_attempts=1)


def as_retry(value: Retry | int | None) -> Retry:
    """``retry=5`` is shorthand for ``Retry(max_attempts=5)``; None means a single attempt."""
    if value is None:
        return NO_RETRY
    if isinstance(value, Retry):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"retry must be a pgtq.Retry or an int, got {value!r}")
    return Retry(max_attempts=value)


def backoff_delays(
    first: float = 0.1, cap: float = 5.0, rand: Callable[[], float] = random.random
) -> Iterator[float]:
    """Capped exponential delays with full jitter, for reconnecting: a fleet that lost its
    database does not come back in one burst."""
    delay = first
    while True:
        yield delay / 2 + delay / 2 * rand()
        delay = min(delay * 2, cap)
