"""The retry policy: pure, so every rule is checked exactly."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgtq
from pgtq.model import ClaimedJob
from pgtq.outcomes import decide, timeout_of
from pgtq.retry import RetryByFunction, as_retry, backoff_delays

pytestmark = pytest.mark.unit


def test_backoff_kinds_and_the_cap() -> None:
    err = ValueError("x")
    exponential = pgtq.Retry(max_attempts=6, base=2, jitter=0, max_delay=10)
    assert [exponential.delay(a, err) for a in range(1, 7)] == [2, 4, 8, 10, 10, None]
    linear = pgtq.Retry(max_attempts=4, backoff="linear", base=3, jitter=0)
    assert [linear.delay(a, err) for a in range(1, 5)] == [3, 6, 9, None]
    fixed = pgtq.Retry(max_attempts=3, backoff="fixed", base=5, jitter=0)
    assert [fixed.delay(a, err) for a in range(1, 4)] == [5, 5, None]


def test_jitter_adds_at_most_its_fraction() -> None:
    policy = pgtq.Retry(max_attempts=3, base=10, jitter=0.5)
    assert policy.delay(1, ValueError(), rand=lambda: 0.0) == 10
    assert policy.delay(1, ValueError(), rand=lambda: 1.0) == 15


def test_retry_on_limits_which_errors_are_retried() -> None:
    policy = pgtq.Retry(max_attempts=5, base=0, retry_on=(ConnectionError,))
    assert policy.delay(1, ConnectionError()) == 0
    assert policy.delay(1, ValueError()) is None


def test_shorthands_and_bad_policies() -> None:
    assert as_retry(None).max_attempts == 1
    assert as_retry(4) == pgtq.Retry(max_attempts=4)
    with pytest.raises(TypeError):
        as_retry("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        pgtq.Retry(max_attempts=0)
    with pytest.raises(ValueError, match="backoff"):
        pgtq.Retry(backoff="random")  # type: ignore[arg-type]


def test_reconnect_delays_grow_to_a_cap_with_jitter() -> None:
    delays = backoff_delays(first=0.1, cap=1.0, rand=lambda: 1.0)
    assert [round(next(delays), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    low = backoff_delays(first=0.1, cap=1.0, rand=lambda: 0.0)
    assert next(low) == 0.05  # half the delay at least


def test_max_delay_caps_the_delay_after_jitter() -> None:
    err = ValueError("x")
    policy = pgtq.Retry(max_attempts=20, base=1, max_delay=10, jitter=0.5)
    # At the cap, the most jitter reaches max_delay and no further.
    assert policy.delay(10, err, rand=lambda: 1.0) == 10
    # And the retries still spread below it (not all at exactly max_delay).
    assert policy.delay(10, err, rand=lambda: 0.0) == pytest.approx(10 / 1.5)
    # Below the cap, jitter only adds.
    assert policy.delay(2, err, rand=lambda: 0.0) == 2
    assert policy.delay(2, err, rand=lambda: 1.0) == 3


@given(
    attempt=st.integers(min_value=1, max_value=200),
    backoff=st.sampled_from(["exponential", "linear", "fixed"]),
    base=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    max_delay=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    jitter=st.floats(min_value=0, max_value=1),
    r=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_no_delay_exceeds_max_delay(
    attempt: int, backoff: Any, base: float, max_delay: float, jitter: float, r: float
) -> None:
    policy = pgtq.Retry(
        max_attempts=attempt + 1, backoff=backoff, base=base, max_delay=max_delay, jitter=jitter
    )
    delay = policy.delay(attempt, ValueError(), rand=lambda: r)
    assert delay is not None
    assert 0 <= delay <= max_delay
    # Jitter never shortens a delay under the cap below the backoff itself.
    no_jitter = pgtq.Retry(
        max_attempts=attempt + 1, backoff=backoff, base=base, max_delay=max_delay, jitter=0
    ).delay(attempt, ValueError())
    assert no_jitter is not None
    if no_jitter * (1 + jitter) <= max_delay:
        assert delay >= no_jitter


def test_a_jobs_own_budget_replaces_the_policys_max_attempts() -> None:
    """``configure(max_attempts=...)``: the job's budget, the policy's backoff and retry_on."""
    err = ValueError("x")
    policy = pgtq.Retry(max_attempts=3, backoff="linear", base=2, jitter=0)
    assert [policy.delay(a, err, max_attempts=5) for a in range(1, 6)] == [2, 4, 6, 8, None]
    assert policy.decide(1, err, max_attempts=1) is None
    decision = policy.decide(3, err, max_attempts=4)
    assert decision is not None and decision.delay == 6
    picky = pgtq.Retry(max_attempts=3, retry_on=(ConnectionError,))
    assert picky.decide(1, err, max_attempts=10) is None
    # No policy (a single attempt): a budget retries with the default backoff, Retry()'s.
    default = as_retry(None).decide(1, err, max_attempts=2)
    assert default is not None and 1.0 <= default.delay <= 1.1


def test_a_jobs_own_budget_caps_a_retry_function() -> None:
    asked: list[int] = []

    def policy(attempt: int, exc: BaseException) -> float | None:
        asked.append(attempt)
        return None if attempt >= 2 else 5.0

    by_function = as_retry(policy)
    assert isinstance(by_function, RetryByFunction)
    first = by_function.decide(1, ValueError(), max_attempts=3)
    assert first is not None and first.delay == 5.0
    assert by_function.decide(2, ValueError(), max_attempts=3) is None  # the function's no
    assert by_function.decide(3, ValueError(), max_attempts=3) is None  # not asked at all
    assert asked == [1, 2]


def _claimed(**fields: Any) -> ClaimedJob:
    return ClaimedJob(1, "default", "t", {}, 1, 0, None)._replace(**fields)


def test_the_outcome_follows_the_jobs_own_budget_and_timeout() -> None:
    app = pgtq.App("postgresql://localhost/x")

    @app.task(retry=pgtq.Retry(max_attempts=2, base=0, jitter=0), timeout=5)
    def t() -> None: ...

    err = ValueError("x")
    assert decide(t, _claimed(attempts=2), exc=err).status is pgtq.Status.FAILED
    assert decide(t, _claimed(attempts=2, max_attempts=3), exc=err).status is pgtq.Status.TODO
    assert decide(t, _claimed(attempts=1, max_attempts=1), exc=err).status is pgtq.Status.FAILED
    timed_out = decide(t, _claimed(timeout=0.5, attempts=2), abort_reason="timeout")
    assert timed_out.status is pgtq.Status.FAILED
    assert timed_out.error is not None and "timeout of 0.5 s" in timed_out.error
    assert timeout_of(t, _claimed()) == 5
    assert timeout_of(t, _claimed(timeout=0.25)) == 0.25
    assert timeout_of(None, _claimed(timeout=0.25)) == 0.25
    # A value no defer writes (a row written by other means): the task's applies.
    for unusable in (0.0, -1.0, float("nan"), float("inf")):
        assert timeout_of(t, _claimed(timeout=unusable)) == 5
