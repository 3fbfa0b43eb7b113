"""When a failed attempt is tried again: a pure policy, no I/O."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from pgtq.validation import check_delay, check_priority, check_queue

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

    def decide(
        self, attempt: int, exc: BaseException, max_attempts: int | None = None
    ) -> RetryDecision | None:
        """The :class:`RetryDecision` after a failed ``attempt`` (None: it was the last).

        ``max_attempts``: the job's own budget (``configure(max_attempts=...)``), which
        replaces the policy's; the backoff and ``retry_on`` stay the policy's."""
        delay = self.delay(attempt, exc, max_attempts=max_attempts)
        return None if delay is None else RetryDecision(delay)

    def delay(
        self,
        attempt: int,
        exc: BaseException,
        rand: Callable[[], float] = random.random,
        *,
        max_attempts: int | None = None,
    ) -> float | None:
        """Seconds before the next attempt, or None when ``attempt`` was the last one (of
        ``max_attempts`` when given, else of the policy's)."""
        most = self.max_attempts if max_attempts is None else max_attempts
        if attempt >= most or not isinstance(exc, self.retry_on):
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


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """Run a failed job again after ``delay`` seconds, in ``queue`` and at ``priority`` when
    given (else where it was): what a retry policy written as a function may return, as
    well as a bare delay. Checked here: a bad value is an error of the policy, which fails
    the attempt without retry (pgtq.outcomes.decide_safely)."""

    delay: float
    queue: str | None = None
    priority: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "delay", check_delay("RetryDecision(delay)", self.delay))
        if self.queue is not None:
            object.__setattr__(self, "queue", check_queue(self.queue))
        if self.priority is not None:
            object.__setattr__(self, "priority", check_priority(self.priority))

    @property
    def move(self) -> tuple[str | None, int | None] | None:
        """The queue and priority to move the job to (None: it stays where it is)."""
        if self.queue is None and self.priority is None:
            return None
        return self.queue, self.priority


#: A retry policy as a function: ``(attempt, exception) -> seconds | RetryDecision | None``
#: (None: no more attempts).
RetryFunction = Callable[[int, BaseException], "float | RetryDecision | None"]


@dataclass(frozen=True)
class RetryByFunction:
    """``@app.task(retry=function)``: the function decides after each failed attempt."""

    function: RetryFunction
    #: Not known in advance: the function decides (logs say "attempt 3", not "3 of 5").
    max_attempts: int | None = None

    def decide(
        self, attempt: int, exc: BaseException, max_attempts: int | None = None
    ) -> RetryDecision | None:
        """The function's decision; ``max_attempts`` (a job's own budget) caps it: past that
        attempt the job is not retried and the function is not asked. It never makes the
        function retry a job it would not."""
        if max_attempts is not None and attempt >= max_attempts:
            return None
        decided = self.function(attempt, exc)
        if decided is None or isinstance(decided, RetryDecision):
            return decided
        return RetryDecision(decided)


NO_RETRY = Retry(max_attempts=1)


def as_retry(value: Retry | RetryFunction | int | None) -> Retry | RetryByFunction:
    """``retry=5`` is shorthand for ``Retry(max_attempts=5)``; None means a single attempt;
    a function is a policy of its own (:class:`RetryByFunction`)."""
    if value is None:
        return NO_RETRY
    if isinstance(value, Retry):
        return value
    if callable(value):
        return RetryByFunction(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"retry must be a pgtq.Retry, an int or a function, got {value!r}")
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
