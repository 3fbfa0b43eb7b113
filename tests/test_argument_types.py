"""Argument and result types beyond JSON against a real PostgreSQL and a real worker, each
through the sync and the async API (``side``): what is stored, what the task gets, a job
deferred from SQL reaching a ``datetime`` parameter, and a decode failure failing its job
alone."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from typer.testing import CliRunner

import pgtq
from pgtq import codecs
from pgtq.cli import cli
from tests.sides import Side

try:
    import pydantic
except ImportError:  # pragma: no cover - pydantic is optional
    pydantic = None  # type: ignore[assignment]


class Plan(enum.Enum):
    FREE = "free"
    PRO = "pro"


@dataclasses.dataclass(frozen=True)
class Address:
    city: str
    since: date


@dataclasses.dataclass(frozen=True)
class Customer:
    id: uuid.UUID
    plan: Plan
    address: Address
    joined: datetime


if pydantic is not None:

    class Order(pydantic.BaseModel):
        id: uuid.UUID
        at: datetime
        total: Decimal


class Money:
    """A type pgtq does not know: ``App(encoder=, decoders=)``."""

    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents

    def __hash__(self) -> int:
        return self.cents


AT = datetime(2026, 12, 3, 10, 0, 0, 250000, tzinfo=timezone(timedelta(hours=-5)))
U = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    """The kind of task: a sync one runs in the worker's threads, an async one on its loop."""
    return str(request.param)


def register(app: pgtq.App, kind: str, func: Any, **options: Any) -> pgtq.Task[Any]:
    """``func`` as a task of this kind (its annotations kept), named after it."""
    if kind == "async":
        sync = func

        @functools.wraps(sync)  # its name, signature and annotations
        async def run(*args: Any, **kwargs: Any) -> Any:
            return sync(*args, **kwargs)

        func = run
    return app.task(name=func.__name__, **options)(func)


async def test_builtin_types_reach_the_task_as_their_types(
    side: Side, app: pgtq.App, kind: str, sql: Any
) -> None:
    got: dict[str, Any] = {}

    def everything(
        when: datetime,
        day: date,
        at: time,
        id: uuid.UUID,
        amount: Decimal,
        plan: Plan,
        customer: Customer,
        days: list[date],
        by_name: dict[str, Plan],
        maybe: datetime | None = None,
        count: int = 0,
    ) -> dict[str, Any]:
        got.update(locals())
        return {"done_at": when + timedelta(hours=1), "amount": amount * 2, "plan": plan}

    task = register(app, kind, everything)
    customer = Customer(U, Plan.PRO, Address("Lyon", date(2020, 1, 2)), AT)
    arguments = {
        "when": AT,
        "day": date(2026, 12, 3),
        "at": time(10, 30),
        "id": U,
        "amount": Decimal("10.10"),
        "plan": Plan.FREE,
        "customer": customer,
        "days": [date(2026, 1, 1), date(2026, 1, 2)],
        "by_name": {"a": Plan.PRO},
        "count": 3,
    }
    job_id = await side.defer(task, **arguments)
    # Stored as plain JSON, readable from SQL: no type tags.
    stored = sql("SELECT args FROM pgtq.jobs WHERE id = %s", job_id)[0][0]
    assert stored["when"] == "2026-12-03T10:00:00.250000-05:00"
    assert stored["amount"] == "10.10" and stored["id"] == str(U) and stored["plan"] == "free"
    assert stored["customer"]["address"] == {"city": "Lyon", "since": "2020-01-02"}
    assert sql("SELECT (args->>'when')::timestamptz FROM pgtq.jobs WHERE id = %s", job_id) == [
        (AT,)
    ]

    await side.run_worker(app, wait=False)
    result = await side.wait(app, job_id)
    assert {name: got[name] for name in arguments} == arguments
    assert got["maybe"] is None
    assert type(got["when"]) is datetime and got["when"].utcoffset() == timedelta(hours=-5)
    # The result is stored as JSON by the same encoder; -> dict[str, Any]: its JSON form.
    assert result == {
        "done_at": "2026-12-03T11:00:00.250000-05:00",
        "amount": "20.20",
        "plan": "free",
    }
    assert codecs.decode(datetime, result["done_at"]) == AT + timedelta(hours=1)


async def test_wait_reads_a_result_back_as_the_return_annotation(
    side: Side, app: pgtq.App, kind: str
) -> None:
    """``wait`` gives a ``-> datetime`` task's result as a datetime (as ``Task[P, R]`` types
    it); ``get`` gives the stored JSON; a plain annotation's result is its JSON."""

    def when(at: datetime) -> datetime:
        return at + timedelta(days=1)

    def who(id: uuid.UUID) -> Customer:
        return Customer(id, Plan.PRO, Address("Lyon", date(2020, 1, 2)), AT)

    def maybe(at: datetime | None) -> datetime | None:
        return at

    def plain(at: datetime) -> dict[str, Any]:
        return {"at": at}

    tasks = [register(app, kind, f) for f in (when, who, maybe, plain)]
    ids = [
        await side.defer(tasks[0], at=AT),
        await side.defer(tasks[1], id=U),
        await side.defer(tasks[2], at=None),
        await side.defer(tasks[3], at=AT),
    ]
    await side.run_worker(app, wait=False)
    assert await side.wait(app, ids[0]) == AT + timedelta(days=1)
    assert await side.wait(app, ids[1]) == who(U)
    assert await side.wait(app, ids[2]) is None
    assert await side.wait(app, ids[3]) == {"at": AT.isoformat()}
    job = await side.get(app, ids[0])
    assert job is not None and job.result == (AT + timedelta(days=1)).isoformat()


@pytest.mark.skipif(pydantic is None, reason="pydantic is not installed")
async def test_a_pydantic_model_reaches_the_task(side: Side, app: pgtq.App, kind: str) -> None:
    got: list[Any] = []

    def ship(order: Order, orders: list[Order]) -> Order:
        got.append((order, orders))
        return order

    task = register(app, kind, ship)
    order = Order(id=U, at=AT, total=Decimal("9.90"))
    job_id = await side.defer(task, order=order, orders=[order])
    await side.run_worker(app, wait=False)
    assert await side.wait(app, job_id) == order  # read back as the return annotation
    assert got == [(order, [order])]
    job = await side.get(app, job_id)
    assert job is not None and job.result == order.model_dump(mode="json")


async def test_a_job_deferred_from_sql_reaches_a_datetime_parameter(
    side: Side, app: pgtq.App, kind: str, sql: Any
) -> None:
    got: list[Any] = []

    def remind(when: datetime, who: uuid.UUID, plan: Plan = Plan.FREE) -> None:
        got.append((when, who, plan))

    register(app, kind, remind)
    sql(
        "SELECT pgtq.defer_job('remind', %s::jsonb)",
        json.dumps({"when": "2026-12-03T10:00:00Z", "who": str(U), "plan": "pro"}),
    )
    sql("SELECT * FROM pgtq.defer_jobs(%s::jsonb)", json.dumps(
        [{"task_name": "remind", "args": {"when": "2026-12-04 08:30:00+01:00", "who": str(U)}}]
    ))  # fmt: skip
    stats = await side.run_worker(app, wait=False)
    assert stats.by_status["succeeded"] == 2
    assert sorted(got) == [
        (datetime(2026, 12, 3, 10, tzinfo=UTC), U, Plan.PRO),
        (datetime(2026, 12, 4, 8, 30, tzinfo=timezone(timedelta(hours=1))), U, Plan.FREE),
    ]


async def test_an_argument_that_cannot_be_read_fails_its_job_alone(
    side: Side, app: pgtq.App, kind: str, sql: Any
) -> None:
    """A string that is no datetime fails that job, at once (no retry could read it), with
    an error naming the parameter; the other jobs of the batch and the worker go on."""
    got: list[datetime] = []

    def remind(when: datetime) -> None:
        got.append(when)

    task = register(app, kind, remind, retry=5)
    good = await side.defer(task, when=AT)
    bad = int(sql("SELECT pgtq.defer_job('remind', '{\"when\": \"tomorrow\"}')")[0][0])
    also_good = await side.defer(task, when=AT + timedelta(days=1))
    stats = await side.run_worker(app, wait=False, batch_size=10)
    assert (stats.by_status["succeeded"], stats.by_status["failed"]) == (2, 1)
    assert sorted(got) == [AT, AT + timedelta(days=1)]
    job = await side.get(app, bad)
    assert job is not None and job.status is pgtq.Status.FAILED and job.attempts == 1
    assert job.error is not None and job.error["type"] == "ArgumentDecodeError"
    assert "argument 'when': cannot be read as datetime from 'tomorrow'" in job.error["message"]
    with pytest.raises(pgtq.JobFailed, match="argument 'when'"):
        await side.wait(app, bad)
    for job_id in (good, also_good):
        assert await side.wait(app, job_id) is None


def money_encoder(value: Any) -> Any:
    if isinstance(value, Money):
        return {"cents": value.cents}
    raise TypeError(f"no JSON for {type(value).__name__}")


async def test_app_encoder_and_decoders(side: Side, dsn: str, kind: str, sql: Any) -> None:
    app = pgtq.App(dsn, encoder=money_encoder, decoders={Money: lambda v: Money(v["cents"])})
    got: list[Any] = []

    def charge(amount: Money, extras: list[Money], when: datetime) -> Money:
        got.append((amount, extras, when))
        return Money(amount.cents + 1)

    try:
        task = register(app, kind, charge)
        one = await side.defer(task, amount=Money(100), extras=[Money(1)], when=AT)
        # The per-job path (tags, meta: insert_each) encodes through the app's hook too.
        many = await side.defer_many(
            task.configure(tags=["billing"], meta={"by": Money(7)}),
            [{"amount": Money(200), "extras": [], "when": AT}],
        )
        stored = sql("SELECT args, meta FROM pgtq.jobs WHERE id = %s", many[0])[0]
        assert stored == (
            {"amount": {"cents": 200}, "extras": [], "when": AT.isoformat()},
            {"by": {"cents": 7}},
        )
        await side.run_worker(app, wait=False)
        assert sorted(got, key=lambda g: g[0].cents) == [
            (Money(100), [Money(1)], AT),
            (Money(200), [], AT),
        ]
        assert await side.wait(app, one) == Money(101)
        job = await side.get(app, one)
        assert job is not None and job.result == {"cents": 101}
        with pytest.raises(pgtq.InvalidArguments, match=r"argument 'amount'.*no JSON for object"):
            await side.defer(task, amount=object(), extras=[], when=AT)
    finally:
        await app.close_async()


async def test_what_cannot_be_encoded_is_refused_naming_it(
    side: Side, app: pgtq.App, sql: Any
) -> None:
    @app.task
    def t(when: datetime, every: Any) -> None: ...

    with pytest.raises(pgtq.InvalidArguments, match=r"\(argument 'every'\).*timedelta"):
        await side.defer(t, when=AT, every=timedelta(days=1))
    with pytest.raises(pgtq.InvalidArguments, match=r"\(job 1 of 2\).*\(argument 'every'\)"):
        await side.defer_many(t, [{"when": AT, "every": 1}, {"when": AT, "every": {1}}])
    assert sql("SELECT count(*) FROM pgtq.jobs") == [(0,)]


def test_the_cli_defers_json_that_reaches_typed_parameters(dsn: str) -> None:
    """``pgtq defer APP TASK '{"when": "..."}'``: JSON from the command line is decoded by the
    worker like any other job's."""
    got: list[Any] = []
    app = pgtq.App(dsn)

    @app.task
    def remind(when: datetime, day: date, plan: Plan) -> None:
        got.append((when, day, plan))

    global cli_app
    cli_app = app
    result = CliRunner().invoke(
        cli,
        [
            "defer",
            f"{__name__}:cli_app",
            "remind",
            '{"when": "2026-12-03T10:00:00+00:00", "day": "2026-12-03", "plan": "pro"}',
            "--dsn",
            dsn,
        ],
    )
    assert result.exit_code == 0, result.output
    app.run_worker(wait=False, install_signal_handlers=False)
    app.close()
    assert got == [(datetime(2026, 12, 3, 10, tzinfo=UTC), date(2026, 12, 3), Plan.PRO)]


cli_app: pgtq.App | None = None
