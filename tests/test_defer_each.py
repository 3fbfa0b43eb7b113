"""Jobs with options of their own: ``configure(tags=, meta=, timeout=, max_attempts=)`` and a
per-job ``defer_many`` of ``(kwargs, options)`` items (``insert_each``): one statement for
the whole batch, keys resolved in it, duplicates reported rather than failing the batch,
one NOTIFY per queue. Through the sync and the async API (``side``), on PostgreSQL; the
pure parts (key resolution, row mapping, the plain statement's SQL) without a database."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.dialects import postgresql

import pgtq
from pgtq import statements
from pgtq.statements import EachJobs, EachRow, Written
from pgtq.tasks import resolve_keys
from tests.conftest import Notifications
from tests.sides import Side


@pytest.fixture
def refresh(app: pgtq.App) -> pgtq.Task[..., Any]:
    @app.task(queue="feeds")
    def refresh_feed(feed: str, reason: str = "") -> None: ...

    return refresh_feed


def keyed(key: str, on_conflict: str = "skip", **options: Any) -> dict[str, Any]:
    return {"queueing_lock": key, "on_conflict": on_conflict, **options}


async def defer_many(side: Side, target: Any, items: list[Any]) -> list[Any]:
    return list(await side.call(target, "defer_many", items))


def flags(ids: list[Any]) -> list[tuple[int, bool]]:
    return [(int(i), i.duplicate) for i in ids]


# -- the hot path stays as it was ----------------------------------------------------------------

#: ``insert_jobs`` as compiled before per-job options existed: a plain defer runs exactly this.
PLAIN_INSERT_SQL = """\
WITH inserted AS \n\
(INSERT INTO pgtq.jobs (queue, task_name, args, priority, scheduled_at, lock, queueing_lock, \
concurrency_key, trace_context) SELECT %(new_queue)s::VARCHAR AS anon_1, \
%(new_task_name)s::VARCHAR AS anon_2, new_jobs.value AS value, %(new_priority)s::INTEGER AS \
anon_3, coalesce(%(new_scheduled_at)s::TIMESTAMP WITH TIME ZONE, now() + %(schedule_in)s * \
interval '1 second') AS coalesce_1, %(new_lock)s::VARCHAR AS anon_4, \
%(new_queueing_lock)s::VARCHAR AS anon_5, %(new_concurrency_key)s::VARCHAR AS anon_6, \
CAST(%(new_trace_context)s::VARCHAR AS JSONB) AS anon_7 \n\
FROM jsonb_array_elements(CAST(%(new_args)s::VARCHAR AS JSONB)) AS new_jobs(value) RETURNING \
pgtq.jobs.id), \n\
announced AS \n\
(SELECT pg_notify('pgtq_pgtq', CASE WHEN (coalesce(%(new_scheduled_at)s::TIMESTAMP WITH TIME \
ZONE, now() + %(schedule_in)s * interval '1 second') IS NULL OR \
coalesce(%(new_scheduled_at)s::TIMESTAMP WITH TIME ZONE, now() + %(schedule_in)s * interval \
'1 second') <= now()) THEN %(param_1)s::VARCHAR || CAST((SELECT inserted.id \n\
FROM inserted \n\
 LIMIT 1) AS TEXT) || %(param_2)s::VARCHAR || CAST(%(new_count)s::INTEGER AS TEXT) ELSE \
%(param_3)s::VARCHAR || CAST(EXTRACT(epoch FROM coalesce(%(new_scheduled_at)s::TIMESTAMP WITH \
TIME ZONE, now() + %(schedule_in)s * interval '1 second') - now()) AS TEXT) END || \
%(param_4)s::VARCHAR || %(new_queue)s::VARCHAR) AS sent \n\
WHERE (SELECT inserted.id \n\
FROM inserted \n\
 LIMIT 1) IS NOT NULL)\n\
 SELECT inserted.id \n\
FROM inserted LEFT OUTER JOIN announced ON true"""


@pytest.mark.unit
def test_a_plain_defer_keeps_its_statement_byte_for_byte() -> None:
    app = pgtq.App("postgresql://nowhere/db")

    @app.task()
    def plain(n: int) -> None: ...

    s = app.statements
    assert str(s.insert_jobs.compile(dialect=postgresql.dialect())) == PLAIN_INSERT_SQL
    # No key, no per-job option: the shared-options encoding, the plain statement.
    deferrer = plain.configure(queue="q", priority=2)
    assert not deferrer.options.per_row
    query = statements.insert_jobs(s, deferrer.encode([{"n": 1}]))
    assert query.statement is s.insert_jobs
    assert plain.configure(tags=["a"]).options.per_row
    assert plain.configure(max_attempts=1).options.per_row


# -- pure: keys resolved in a batch, rows mapped back ---------------------------------------------


@pytest.mark.unit
def test_a_repeated_key_is_written_once() -> None:
    lock, period = ("lock", "k"), ("period", "k")
    keys: list[Any] = [
        None,
        (lock, False),  # skip: the first wins...
        (lock, False),
        (period, False),  # ...another index: its own job
        None,
        (("lock", "r"), True),
        (("lock", "r"), False),
        (("lock", "r"), True),  # replace: the last wins
        (("lock", "r"), False),
    ]
    assert resolve_keys(keys) == [0, 1, 1, 3, 4, 7, 7, 7, 7]


@pytest.mark.unit
def test_rows_map_back_to_positions() -> None:
    def row(key: str | None = None, period: bool = False) -> EachRow:
        mode: Any = "plain" if key is None else "keep_period" if period else "keep"
        return EachRow(mode, "q", 0, {}, queueing_lock=key, unique_for=60.0 if period else None)

    rows = [row(), row("k"), row(), row("k"), row("k", period=True), row("x@y")]
    each = EachJobs.make("t", None, rows, [0, 1, 2, 1, 4, 5])
    assert (each.modes, each.plain) == (("plain", "keep", "keep_period"), [0, 2])
    assert each.keyed == {("lock", "k"): 1, ("period", "k"): 4, ("lock", "x@y"): 5}
    returned = [  # as the statement returns them: any order, a period's key with its number
        ("lock", 30, "x@y", True, False),
        ("plain", 12, None, True, False),
        ("period", 9, "k@29000000", False, False),
        ("plain", 11, None, True, False),
        ("lock", 7, "k", False, True),
    ]
    assert statements.each_written(each, returned) == [
        Written(11, True),
        Written(7, False, True),
        Written(12, True),
        Written(7, False),  # the in-batch duplicate of position 1
        Written(9, False),
        Written(30, True),
    ]
    with pytest.raises(ValueError, match="written twice"):
        EachJobs.make("t", None, [row("k"), row("k")], [0, 1])


# -- per-job options stored ----------------------------------------------------------------------


async def test_tags_meta_timeout_and_max_attempts_are_stored(
    side: Side, app: pgtq.App, refresh: Any
) -> None:
    configured = refresh.configure(
        tags=["b", "a", "b"],
        meta={"by": "ops", "ticket": [1, {"x": None}]},
        timeout=timedelta(seconds=90),
        max_attempts=4,
    )
    one = await side.defer(configured, feed="1")
    job = await side.get(app, one)
    assert job is not None
    assert (job.tags, job.meta, job.timeout, job.max_attempts) == (
        ["b", "a"],  # repeats dropped, the first kept
        {"by": "ops", "ticket": [1, {"x": None}]},
        90.0,
        4,
    )
    assert (job.args, job.queue, job.status) == ({"feed": "1"}, "feeds", pgtq.Status.TODO)
    many = await side.defer_many(configured, [{"feed": "2"}, {"feed": "3"}])
    assert many == sorted(many) and one < many[0]
    for job_id in many:
        got = await side.get(app, job_id)
        assert got is not None and (got.tags, got.max_attempts) == (["b", "a"], 4)
    plain = await side.get(app, await side.defer(refresh, feed="4"))
    assert plain is not None
    assert (plain.tags, plain.meta, plain.timeout, plain.max_attempts) == (None, None, None, None)


async def test_a_keyed_defer_with_options_keeps_the_keyed_semantics(
    side: Side, app: pgtq.App, refresh: Any, sql: Any
) -> None:
    """``configure()`` with a key and per-job options goes through ``insert_each`` and acts
    as any keyed defer: raise names the holder, skip returns it, replace debounces it, and
    one configure() for several jobs keeps its rules."""
    first = await side.call(refresh.configure(queueing_lock="k", tags=["t"]), "defer", feed="1")
    assert isinstance(first, pgtq.Deferred) and not first.duplicate
    with pytest.raises(pgtq.AlreadyEnqueued, match=f"job {first} holds this key") as caught:
        await side.call(refresh.configure(queueing_lock="k", meta={"a": 1}), "defer", feed="2")
    assert caught.value.job_id == first
    skipped = await side.call(
        refresh.configure(queueing_lock="k", on_conflict="skip", max_attempts=2), "defer", feed="3"
    )
    assert flags([skipped]) == [(first, True)]
    replaced = await side.call(
        refresh.configure(queueing_lock="k", on_conflict="replace", priority=5, meta={"v": 2}),
        "defer",
        feed="4",
    )
    assert flags([replaced]) == [(first, True)]
    job = await side.get(app, first)
    assert job is not None
    # Replaced: arguments, priority, and the options it gives; the tags it gives not: kept.
    assert (job.args, job.priority, job.meta, job.tags, job.max_attempts) == (
        {"feed": "4"},
        5,
        {"v": 2},
        ["t"],
        None,
    )
    with pytest.raises(pgtq.InvalidArguments, match="queueing_lock: 2 jobs with one key"):
        await side.defer_many(refresh.configure(queueing_lock="j", tags=["t"]), [{"feed": "a"}] * 2)
    sql("UPDATE pgtq.jobs SET task_name = 'other' WHERE id = %s", first)
    with pytest.raises(pgtq.AlreadyEnqueued, match="another task"):
        await side.call(
            refresh.configure(queueing_lock="k", on_conflict="replace", tags=["t"]),
            "defer",
            feed="5",
        )


# -- per-job batches ------------------------------------------------------------------------------


async def test_a_batch_mixes_plain_skip_replace_and_per_period_jobs(
    side: Side, app: pgtq.App, refresh: Any, sql: Any
) -> None:
    held = await side.defer(refresh.configure(queueing_lock="held"), feed="held")
    waiting = await side.defer(refresh.configure(queueing_lock="debounce"), feed="old")
    at = datetime(2031, 1, 1, tzinfo=UTC)
    items = [
        {"feed": "plain-0"},
        ({"feed": "skip"}, keyed("held")),
        ({"feed": "new"}, keyed("new", "replace", tags=["n"])),
        ({"feed": "newer"}, keyed("debounce", "replace", schedule_at=at, priority=3)),
        ({"feed": "daily"}, keyed("daily", unique_for=86_400, meta={"d": 1})),
        ({"feed": "plain-1"}, {"queue": "other", "timeout": 5}),
        ({"feed": "raise"}, keyed("held", "raise")),  # raise acts as skip in a batch
    ]
    ids = await defer_many(side, refresh, items)
    assert all(isinstance(i, pgtq.Deferred) for i in ids)
    assert [i.duplicate for i in ids] == [False, True, False, True, False, False, True]
    assert (ids[1], ids[3], ids[6]) == (held, waiting, held)
    assert ids[0] < ids[5]  # plain jobs in the order of the items
    stored = {
        job_id: (args["feed"], queue, tags, meta, timeout, unique_key is not None)
        for job_id, args, queue, tags, meta, timeout, unique_key in sql(
            "SELECT id, args, queue, tags, meta, timeout, unique_key FROM pgtq.jobs"
        )
    }
    assert stored == {
        held: ("held", "feeds", None, None, None, False),
        waiting: ("newer", "feeds", None, None, None, False),  # replaced
        ids[0]: ("plain-0", "feeds", None, None, None, False),
        ids[2]: ("new", "feeds", ["n"], None, None, False),
        ids[4]: ("daily", "feeds", None, {"d": 1}, None, True),
        ids[5]: ("plain-1", "other", None, None, 5.0, False),
    }
    assert sql("SELECT scheduled_at, priority FROM pgtq.jobs WHERE id = %s", waiting) == [(at, 3)]
    # The period holds its key whatever happens to the job: a second batch finds it.
    sql("UPDATE pgtq.jobs SET status = 'succeeded' WHERE id = %s", ids[4])
    again = await defer_many(side, refresh, [({"feed": "x"}, keyed("daily", unique_for=86_400))])
    assert flags(again) == [(ids[4], True)]


async def test_a_repeated_key_in_one_batch(side: Side, refresh: Any, sql: Any) -> None:
    items = [
        ({"feed": "s1"}, keyed("s")),
        ({"feed": "r1"}, keyed("r", "replace")),
        ({"feed": "s2"}, keyed("s")),
        ({"feed": "r2"}, keyed("r", "replace")),
        ({"feed": "r3"}, keyed("r")),  # a skip after the replaces: their duplicate
        ({"feed": "s3"}, keyed("s", "raise")),
    ]
    ids = await defer_many(side, refresh, items)
    assert [i.duplicate for i in ids] == [False, True, True, False, True, True]
    assert ids[0] == ids[2] == ids[5] and ids[1] == ids[3] == ids[4]
    assert sorted(sql("SELECT queueing_lock, args->>'feed' FROM pgtq.jobs")) == [
        ("r", "r2"),  # replace: the last wins
        ("s", "s1"),  # skip and raise: the first
    ]


async def test_replace_blocked_by_a_running_holder_returns_it_untouched(
    side: Side, app: pgtq.App, refresh: Any, sql: Any
) -> None:
    @app.task(queue="feeds")
    def other(feed: str) -> None: ...

    running = await side.defer(refresh.configure(queueing_lock="p", unique_for=3600), feed="0")
    sql("UPDATE pgtq.jobs SET status = 'doing', worker_id = 'w' WHERE id = %s", running)
    theirs = await side.defer(other.configure(queueing_lock="o"), feed="x")
    before = sql("SELECT * FROM pgtq.jobs ORDER BY id")
    ids = await defer_many(
        side,
        refresh,
        [
            ({"feed": "1"}, keyed("p", "replace", unique_for=3600, priority=9, meta={"m": 1})),
            ({"feed": "2"}, keyed("o", "replace", tags=["t"])),
            {"feed": "3"},
        ],
    )
    assert flags(ids[:2]) == [(running, True), (theirs, True)]
    assert not ids[2].duplicate
    assert sql("SELECT * FROM pgtq.jobs WHERE id <> %s ORDER BY id", ids[2]) == before


async def test_a_bad_item_is_named_before_anything_is_written(
    side: Side, refresh: Any, sql: Any
) -> None:
    good = [{"feed": "1"}, ({"feed": "2"}, keyed("k"))]
    for bad, message in [
        (({"feed": "3"}, {"queueing_lock": ""}), "item 2: queueing_lock: must not be empty"),
        (({"feed": "3"}, {"tags": "one"}), "item 2: tags: must be a list"),
        (({"feed": "3"}, {"max_attempts": 0}), "item 2: max_attempts: must be from 1"),
        (({"feed": "3"}, {"colour": "red"}), r"item 2: unknown option\(s\) \['colour'\]"),
        (({"feed": "3"}, ["queue", "q"]), "item 2: options: must be a mapping"),
        (({"feed": "3"},), "item 2: a \\(kwargs, options\\) pair has two parts"),
        (({"nope": "3"}, {}), "item 2: task 'refresh_feed': arguments:"),
        (({"feed": float("nan")}, {}), "item 2: task 'refresh_feed': arguments: must be JSON"),
        ("feed", "item 2: task 'refresh_feed': defer_many takes mappings"),
    ]:
        with pytest.raises(pgtq.InvalidArguments, match=f"^{message}"):
            await defer_many(side, refresh, [*good, bad, ({"feed": "4"}, keyed("z"))])
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


async def test_an_items_options_lie_over_the_deferrers(
    side: Side, app: pgtq.App, refresh: Any
) -> None:
    base = refresh.configure(queue="q", priority=2, schedule_in=3600, tags=["base"])
    ids = await defer_many(
        side,
        base,
        [
            {"feed": "as configured"},
            ({"feed": "own queue"}, {"queue": "r"}),
            ({"feed": "due"}, {"schedule_at": datetime(2001, 1, 1, tzinfo=UTC)}),
        ],
    )
    jobs = [await side.get(app, i) for i in ids]
    assert [(j.queue, j.priority, j.tags) for j in jobs if j] == [
        ("q", 2, ["base"]),
        ("r", 2, ["base"]),
        ("q", 2, ["base"]),
    ]
    scheduled = [j.scheduled_at for j in jobs if j]
    assert scheduled[0] == scheduled[1] and scheduled[0] is not None
    assert scheduled[0] > datetime.now(UTC) + timedelta(minutes=50)
    assert scheduled[2] == datetime(2001, 1, 1, tzinfo=UTC)  # one schedule replaces the other


async def test_a_blueprint_task_defers_a_per_job_batch(side: Side, app: pgtq.App) -> None:
    bp = pgtq.Blueprint()

    @bp.task(queue="bp")
    def ping(n: int) -> None: ...

    app.add_tasks_from(bp, namespace="x")
    ids = await defer_many(side, ping, [{"n": 1}, ({"n": 2}, keyed("k")), ({"n": 3}, keyed("k"))])
    assert [i.duplicate for i in ids] == [False, False, True] and ids[1] == ids[2]


async def test_one_notify_per_queue_of_new_jobs(
    side: Side, refresh: Any, notifications: Notifications
) -> None:
    held = await side.defer(refresh.configure(queueing_lock="held"), feed="held")
    await notifications.until_marker()
    ids = await defer_many(
        side,
        refresh,
        [
            ({"feed": "1"}, {"queue": "a"}),
            ({"feed": "2"}, {"queue": "a", **keyed("ka")}),
            ({"feed": "3"}, {"queue": "b", "schedule_in": 3600}),
            ({"feed": "4"}, {"queue": "b", "schedule_in": 7200, "tags": ["later"]}),
            ({"feed": "5"}, {"queue": "c", **keyed("held")}),  # a duplicate: wakes nobody
            {"feed": "6"},
        ],
    )
    assert ids[4] == held and ids[4].duplicate
    heard = await notifications.until_marker()
    assert sorted(a.queue for a in heard) == ["a", "b", "feeds"]
    by_queue = {a.queue: a for a in heard}
    assert (by_queue["a"].first, by_queue["a"].jobs) == (min(ids[0], ids[1]), 2)
    assert (by_queue["feeds"].first, by_queue["feeds"].jobs) == (ids[5], 1)
    due_in = by_queue["b"].due_in
    assert due_in is not None and 3500 < due_in <= 3600  # the earliest of the queue
    # Nothing new: nothing announced.
    again = await defer_many(side, refresh, [({"feed": "5"}, {"queue": "c", **keyed("held")})])
    assert flags(again) == [(held, True)]
    assert await notifications.until_marker() == []


async def test_concurrent_batches_never_make_two_waiting_jobs_of_a_key(
    side: Side, refresh: Any, sql: Any
) -> None:
    """Two batches of the same keys at once (in threads on the sync side, concurrent
    coroutines on the async one), in different orders, round after round: each key gets one
    new job, which both report, and never a second waiting job."""
    keys = [f"k{i}" for i in range(12)]
    for round_ in range(8):

        def batch(order: list[str], round_: int = round_) -> list[Any]:
            return [
                ({"feed": k}, keyed(k, "replace" if int(k[1:]) % 2 else "skip")) for k in order
            ] + [{"feed": f"plain {round_}"}]

        shuffled = random.Random(round_).sample(keys, len(keys))
        first, second = await asyncio.gather(
            defer_many(side, refresh, batch(keys)), defer_many(side, refresh, batch(shuffled))
        )
        for key in keys:
            a, b = first[keys.index(key)], second[shuffled.index(key)]
            assert a == b and sorted([a.duplicate, b.duplicate]) == [False, True], key
        assert (
            sql(
                "SELECT queueing_lock FROM pgtq.jobs WHERE status = 'todo' "
                "AND queueing_lock IS NOT NULL GROUP BY 1 HAVING count(*) > 1"
            )
            == []
        )
        sql("UPDATE pgtq.jobs SET status = 'succeeded' WHERE status = 'todo'")  # free the keys
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(8 * (len(keys) + 2),)]
