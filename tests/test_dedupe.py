"""A ``queueing_lock`` and what a defer does when a job with that key already waits:
``on_conflict="raise"`` (AlreadyEnqueued, naming the waiting job), ``"skip"`` (its id
back, marked a duplicate), ``"replace"`` (it takes the new arguments, schedule and priority:
a debounce). Through the sync and the async API (``side``), on PostgreSQL."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

import pgtq
from pgtq.connectors import sync_url
from tests.conftest import Notifications
from tests.sides import Side


@pytest.fixture
def refresh(app: pgtq.App) -> pgtq.Task[..., Any]:
    @app.task(queue="feeds")
    def refresh_feed(feed: str, reason: str = "") -> None: ...

    return refresh_feed


async def defer(side: Side, deferrer: Any, **kwargs: Any) -> Any:
    """The id as ``defer`` returns it (a ``pgtq.Deferred`` for a keyed job)."""
    return await side.call(deferrer, "defer", **kwargs)


async def test_raise_names_the_waiting_job(side: Side, refresh: Any, sql: Any) -> None:
    keyed = refresh.configure(queueing_lock="feed-1")
    first = await defer(side, keyed, feed="1")
    assert isinstance(first, pgtq.Deferred) and not first.duplicate
    with pytest.raises(
        pgtq.AlreadyEnqueued, match=f"job {first} holds this key while it waits"
    ) as caught:
        await defer(side, keyed, feed="1", reason="again")
    assert caught.value.job_id == first
    assert sql("SELECT id, args->>'reason' FROM pgtq.jobs") == [(first, None)]


async def test_skip_returns_the_waiting_job(
    side: Side, refresh: Any, sql: Any, notifications: Notifications
) -> None:
    keyed = refresh.configure(queueing_lock="feed-1", on_conflict="skip")
    first = await defer(side, keyed, feed="1")
    await notifications.until_marker()
    again = await defer(side, keyed, feed="1", reason="again")
    assert (again, again.duplicate, first.duplicate) == (first, True, False)
    assert sql("SELECT id, args->>'reason' FROM pgtq.jobs WHERE queue = 'feeds'") == [(first, None)]
    assert [a.queue for a in await notifications.until_marker()] == []  # nothing new: no wake-up
    # Once the waiting job runs, the key is free: the next defer makes a new job.
    sql("UPDATE pgtq.jobs SET status = 'doing' WHERE id = %s", first)
    later = await defer(side, keyed, feed="1")
    assert later != first and not later.duplicate


async def test_replace_debounces_the_waiting_job(side: Side, refresh: Any, sql: Any) -> None:
    first = await defer(side, refresh.configure(queueing_lock="feed-1"), feed="1")
    at = datetime(2031, 1, 1, tzinfo=UTC)
    replacing = refresh.configure(
        queueing_lock="feed-1", on_conflict="replace", schedule_at=at, priority=9
    )
    again = await defer(side, replacing, feed="1", reason="newer")
    assert (again, again.duplicate) == (first, True)
    assert sql("SELECT args, scheduled_at, priority, status FROM pgtq.jobs") == [
        ({"feed": "1", "reason": "newer"}, at, 9, "todo")
    ]


async def test_replace_leaves_another_tasks_job_alone(
    side: Side, app: pgtq.App, refresh: Any, sql: Any
) -> None:
    @app.task(queue="feeds")
    def other(feed: str) -> None: ...

    theirs = await defer(side, other.configure(queueing_lock="feed-1"), feed="x")
    with pytest.raises(pgtq.AlreadyEnqueued, match="another task"):
        await defer(
            side, refresh.configure(queueing_lock="feed-1", on_conflict="replace"), feed="1"
        )
    assert sql("SELECT id, task_name, args FROM pgtq.jobs") == [(theirs, "other", {"feed": "x"})]


async def test_defer_many_with_one_key(side: Side, refresh: Any, sql: Any) -> None:
    jobs = [{"feed": "1", "reason": r} for r in ("a", "b", "c")]
    with pytest.raises(pgtq.InvalidArguments, match="queueing_lock: 3 jobs with one key"):
        await side.call(refresh.configure(queueing_lock="k"), "defer_many", jobs)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]  # refused before writing

    skipped = await side.call(
        refresh.configure(queueing_lock="k", on_conflict="skip"), "defer_many", jobs
    )
    assert len(set(skipped)) == 1 and [d.duplicate for d in skipped] == [False, True, True]
    assert sql("SELECT args->>'reason' FROM pgtq.jobs") == [("a",)]  # the first

    replaced = await side.call(
        refresh.configure(queueing_lock="k", on_conflict="replace"), "defer_many", jobs
    )
    assert replaced == skipped and all(d.duplicate for d in replaced)
    assert sql("SELECT args->>'reason' FROM pgtq.jobs") == [("c",)]  # the newest wins


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_conflict": "ignore", "queueing_lock": "k"}, "on_conflict: must be one of"),
        ({"on_conflict": "skip"}, "on_conflict: 'skip' needs a queueing_lock"),
        ({"on_conflict": "replace"}, "on_conflict: 'replace' needs a queueing_lock"),
    ],
)
def test_on_conflict_is_checked_when_configured(
    refresh: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(pgtq.InvalidArguments, match=message):
        refresh.configure(**options)


async def test_concurrent_skips_make_one_job(side: Side, refresh: Any, sql: Any) -> None:
    keyed = refresh.configure(queueing_lock="feed-1", on_conflict="skip")
    results = await asyncio.gather(*(defer(side, keyed, feed="1") for _ in range(20)))
    assert len(set(results)) == 1
    assert sorted(r.duplicate for r in results) == [False] + [True] * 19
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(1,)]


async def test_skip_finds_a_job_committed_while_it_waited(
    side: Side, dsn: str, refresh: Any, sql: Any
) -> None:
    """A job with the key inserted by a transaction still open: the skipping defer waits
    for it, and once it commits gets that job's id (committed after the skip began, so
    invisible to its snapshot: the conflict's update returns it)."""
    engine = sa.create_engine(sync_url(dsn))
    inserted = threading.Event()
    commit = threading.Event()
    held: list[int] = []

    def open_transaction() -> None:
        with engine.connect() as conn:
            held.append(refresh.configure(queueing_lock="feed-1").defer(feed="1", connection=conn))
            inserted.set()
            commit.wait(10)
            conn.commit()

    opener = asyncio.create_task(asyncio.to_thread(open_transaction))
    await asyncio.to_thread(inserted.wait, 10)
    skipping = asyncio.create_task(
        defer(side, refresh.configure(queueing_lock="feed-1", on_conflict="skip"), feed="1")
    )
    blocked = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'"
    )
    deadline = asyncio.get_running_loop().time() + 10
    while sql(blocked) != [(1,)]:  # the skip waits on the open transaction's row
        assert asyncio.get_running_loop().time() < deadline, "the skip never waited"
        await asyncio.sleep(0.01)
    commit.set()
    await opener
    got = await skipping
    engine.dispose()
    assert (got, got.duplicate) == (held[0], True)
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(1,)]


def test_a_deferred_id_reads_as_its_number() -> None:
    deferred = pgtq.Deferred(42, duplicate=True)
    assert deferred == 42 and str(deferred) == f"{deferred}" == "42" and deferred.duplicate
    assert repr(deferred) == "Deferred(42, duplicate=True)"


# -- unique_for: one job per key and period ------------------------------------------------


async def test_unique_for_holds_the_key_for_the_period_whatever_the_status(
    side: Side, refresh: Any, sql: Any
) -> None:
    daily = refresh.configure(queueing_lock="digest", unique_for=timedelta(days=3650))
    first = await defer(side, daily, feed="1")
    sql("UPDATE pgtq.jobs SET status = 'succeeded' WHERE id = %s", first)  # it ran
    with pytest.raises(pgtq.AlreadyEnqueued, match="holds this key in this period") as caught:
        await defer(side, daily, feed="1")
    assert caught.value.job_id == first
    skipping = refresh.configure(
        queueing_lock="digest", unique_for=timedelta(days=3650), on_conflict="skip"
    )
    again = await defer(side, skipping, feed="1")
    assert (again, again.duplicate) == (first, True)
    with pytest.raises(pgtq.AlreadyEnqueued, match="no longer waiting"):  # it ran: not replaced
        await defer(
            side,
            refresh.configure(
                queueing_lock="digest", unique_for=timedelta(days=3650), on_conflict="replace"
            ),
            feed="2",
        )
    # A failed or cancelled job frees its period's key.
    sql("UPDATE pgtq.jobs SET status = 'failed' WHERE id = %s", first)
    fresh = await defer(side, daily, feed="1")
    assert fresh != first and not fresh.duplicate
    assert sql("SELECT count(*) FROM pgtq.jobs WHERE queueing_lock IS NOT NULL") == [(0,)]


async def test_unique_for_makes_a_new_job_in_the_next_period(
    side: Side, refresh: Any, sql: Any
) -> None:
    every_second = refresh.configure(queueing_lock="tick", unique_for=1, on_conflict="skip")

    def period() -> int:
        return int(sql("SELECT floor(extract(epoch FROM now()))::bigint")[0][0])

    started = period()
    first = await defer(side, every_second, feed="1")
    deadline = asyncio.get_running_loop().time() + 10
    while period() == started:  # the server's clock enters the next period
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    second = await defer(side, every_second, feed="1")
    assert second != first and not second.duplicate
    keys = [k for (k,) in sql("SELECT unique_key FROM pgtq.jobs ORDER BY id")]
    assert len(keys) == 2 and all(k.startswith("tick@") for k in keys) and keys[0] != keys[1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unique_for": 60}, "unique_for: needs a queueing_lock"),
        ({"unique_for": 0, "queueing_lock": "k"}, "unique_for: must be a period over zero"),
        ({"unique_for": "1h", "queueing_lock": "k"}, "unique_for: must be a timedelta"),
    ],
)
def test_unique_for_is_checked_when_configured(
    refresh: Any, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(pgtq.InvalidArguments, match=message):
        refresh.configure(**options)
