"""The retry policy: pure, so every rule is checked exactly."""

from __future__ import annotations

import pytest

import pgtq
from pgtq.retry import as_retry, backoff_delays


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
