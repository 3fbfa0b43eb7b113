"""Blueprints (tasks declared without the app), namespaces, aliases, and name clashes."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

import pgtq
from pgtq.blueprints import UnboundTask
from pgtq.cli import cli
from tests.sides import Side

SQL = Callable[..., list[tuple[Any, ...]]]


def make_billing() -> tuple[pgtq.Blueprint, pgtq.BlueprintTask, pgtq.BlueprintTask]:
    """What a module that does not know the app writes."""
    bp = pgtq.Blueprint()

    @bp.task(queue="billing", aliases=["charge_card"])
    def charge(ctx: pgtq.JobContext, order_id: int) -> str:
        return f"charged {order_id} as {ctx.task_name}"

    @bp.task
    async def refund(order_id: int) -> dict[str, int]:
        return {"refunded": order_id}

    return bp, charge, refund


async def test_blueprint_tasks_run_under_their_namespace(side: Side, dsn: str, sql: SQL) -> None:
    bp, charge, refund = make_billing()
    app = pgtq.App(dsn)
    app.add_tasks_from(bp, namespace="billing")
    assert sorted(app.tasks) == ["billing:charge", "billing:refund"]
    assert app.tasks["billing:charge"] is charge.task  # an ordinary Task, registered as such
    assert isinstance(charge.task, pgtq.Task) and charge.name == "billing:charge"
    assert charge.defaults.queue == "billing"  # the task's attributes through the declaration

    c = await side.defer(charge, order_id=7)
    r = await side.defer(refund.configure(priority=3), order_id=8)
    await side.run_worker(app, wait=False)
    assert await side.wait(app, c) == "charged 7 as billing:charge"
    assert await side.wait(app, r) == {"refunded": 8}
    assert sql("SELECT task_name, queue, priority FROM pgtq.jobs ORDER BY id") == [
        ("billing:charge", "billing", 0),
        ("billing:refund", "default", 3),
    ]
    await app.close_async()


async def test_a_job_deferred_under_an_old_name_runs_after_the_rename(
    side: Side, dsn: str, sql: SQL
) -> None:
    before = pgtq.App(dsn)  # the previous release

    @before.task(name="charge_card")
    def old(order_id: int) -> str:
        return "old code"

    old_job = await side.defer(old, order_id=1)

    after = pgtq.App(dsn)  # the new release: renamed, the old name kept as an alias

    @after.task(name="charge", aliases=["charge_card"])
    def charge(order_id: int) -> str:
        return f"new code {order_id}"

    new_job = await side.defer(charge, order_id=2)
    await side.run_worker(after, wait=False)
    assert await side.wait(after, old_job) == "new code 1"
    assert await side.wait(after, new_job) == "new code 2"
    assert sql("SELECT task_name FROM pgtq.jobs ORDER BY id") == [("charge_card",), ("charge",)]
    assert list(after.tasks) == ["charge"]  # one entry per real task
    assert after.lookup_task("charge_card") is after.get_task("charge_card") is charge
    await before.close_async()
    await after.close_async()


async def test_blueprint_aliases_are_namespaced_and_app_aliases_are_not(
    side: Side, dsn: str
) -> None:
    old_app = pgtq.App(dsn)

    @old_app.task(name="billing:charge_card")
    def renamed(order_id: int) -> None: ...

    @old_app.task(name="refund")
    def moved(order_id: int) -> None: ...

    renamed_job = await side.defer(renamed, order_id=1)
    moved_job = await side.defer(moved, order_id=2)

    bp, _, _ = make_billing()
    app = pgtq.App(dsn)
    app.add_tasks_from(bp, namespace="billing")
    assert app.aliases == {"billing:charge_card": "billing:charge"}
    # A task that moved into a namespace keeps its old, global name with add_task_alias.
    app.add_task_alias("billing:refund", "refund")
    await side.run_worker(app, wait=False)
    assert await side.wait(app, renamed_job) == "charged 1 as billing:charge_card"
    assert await side.wait(app, moved_job) == {"refunded": 2}
    await old_app.close_async()
    await app.close_async()


@pytest.mark.unit
def test_deferring_before_the_blueprint_is_added_is_a_clear_error() -> None:
    _, charge, refund = make_billing()
    with pytest.raises(UnboundTask, match=r"app\.add_tasks_from") as info:
        charge.defer(order_id=1)
    assert "'charge'" in str(info.value)
    assert isinstance(info.value, pgtq.ConfigurationError)
    with pytest.raises(UnboundTask):
        refund.configure(priority=1)
    # Still a plain callable, as an app's task is.
    assert charge(SimpleNamespace(task_name="t"), order_id=3) == "charged 3 as t"
    assert "not added yet" in repr(charge)
    assert not hasattr(charge, "defaults")  # the task's attributes come with the app
    assert getattr(charge, "retry", None) is None


@pytest.mark.unit
def test_a_name_clash_is_an_error_at_registration_naming_both() -> None:
    app = pgtq.App("postgresql://localhost/x")

    @app.task(name="billing:charge")
    def legacy_charge() -> None: ...

    bp, charge, _ = make_billing()
    with pytest.raises(pgtq.ConfigurationError) as info:
        app.add_tasks_from(bp, namespace="billing")
    message = str(info.value)
    assert "'billing:charge'" in message
    assert "legacy_charge" in message and "make_billing.<locals>.charge" in message
    # All or nothing: the blueprint's other task was not registered either.
    assert list(app.tasks) == ["billing:charge"] and app.aliases == {}
    assert not charge.is_bound
    # Under another namespace it fits.
    app.add_tasks_from(bp, namespace="payments")
    assert sorted(app.tasks) == ["billing:charge", "payments:charge", "payments:refund"]


@pytest.mark.unit
def test_aliases_clash_with_names_and_with_other_aliases() -> None:
    app = pgtq.App("postgresql://localhost/x")

    @app.task(aliases=["old_send"])
    def send() -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match=r"'send' is already registered \(name"):

        @app.task(name="other", aliases=["send"])
        def other() -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match=r"'old_send' is already registered \(alias"):

        @app.task(name="old_send")
        def shadow() -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match="a list of names"):
        app.task(name="x", aliases="old_x")(lambda: None)
    with pytest.raises(pgtq.ConfigurationError, match="already registered"):
        app.add_task_alias("send", "send")
    assert list(app.tasks) == ["send"] and app.aliases == {"old_send": "send"}


@pytest.mark.unit
def test_a_clash_inside_a_blueprint_is_an_error_when_declared() -> None:
    bp = pgtq.Blueprint()

    @bp.task(aliases=["b"])
    def a() -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match=r"'b' is already declared") as info:

        @bp.task(name="b")
        def second() -> None: ...

    assert "a" in str(info.value) and "second" in str(info.value)
    assert bp.names() == ["a"]


@pytest.mark.unit
def test_blueprint_tasks_are_registered_exactly_like_app_tasks() -> None:
    def app_wide(ctx: pgtq.JobContext, call_next: Callable[[], Any]) -> Any:
        return call_next()

    app = pgtq.App("postgresql://localhost/x", middleware=[app_wide])
    bp, charge, refund = make_billing()
    app.add_tasks_from(bp)  # no namespace: the declared names
    assert charge.task.middleware == (app_wide,)  # the app's middleware, as @app.task gives
    assert refund.task.middleware == ()  # (a sync middleware does not wrap an async task)
    assert charge.task.pass_context and not refund.task.pass_context
    assert charge.task.app is app and refund.task.is_async
    # The same keyword options as App.task.
    params = inspect.signature(pgtq.Blueprint.task).parameters
    assert list(params) == list(inspect.signature(pgtq.App.task).parameters)


@pytest.mark.unit
def test_nested_blueprints_and_several_apps() -> None:
    inner, charge, _ = make_billing()
    outer = pgtq.Blueprint()
    outer.add_tasks_from(inner, namespace="cards")

    @outer.task
    def audit() -> None: ...

    first = pgtq.App("postgresql://localhost/x")
    second = pgtq.App("postgresql://localhost/y")
    first.add_tasks_from(outer, namespace="billing")
    second.add_tasks_from(inner)
    assert sorted(first.tasks) == ["billing:audit", "billing:cards:charge", "billing:cards:refund"]
    assert first.aliases == {"billing:cards:charge_card": "billing:cards:charge"}
    assert charge.task_on(first).name == "billing:cards:charge"
    assert charge.task_on(second).name == "charge"
    assert charge.task is charge.task_on(second)  # defer goes through the last app
    with pytest.raises(pgtq.ConfigurationError, match="non-empty"):
        first.add_tasks_from(inner, namespace="")


@pytest.mark.unit
def test_blueprint_periodic_tasks() -> None:
    bp = pgtq.Blueprint()

    @bp.periodic(cron="*/5 * * * *", periodic_id="five")
    @bp.task
    def tick(timestamp: int) -> None: ...

    with pytest.raises(pgtq.ConfigurationError, match="cron"):
        bp.periodic(cron="not a cron")

    app = pgtq.App("postgresql://localhost/x")
    app.add_tasks_from(bp, namespace="clock")
    [schedule] = app.periodic_tasks
    assert schedule.task is tick.task and tick.name == "clock:tick"


def test_the_cli_defers_a_blueprint_task_by_its_full_name_or_an_alias(dsn: str, sql: SQL) -> None:
    for name in ("billing:charge", "billing:charge_card"):
        result = CliRunner().invoke(
            cli,
            ["defer", "tests.apps.blueprinted:app", name, '{"order_id": 5}'],
            env={"PGTQ_DSN": dsn},
        )
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        cli, ["worker", "tests.apps.blueprinted:app", "--one-shot"], env={"PGTQ_DSN": dsn}
    )
    assert result.exit_code == 0, result.output
    assert sql("SELECT task_name, status, result FROM pgtq.jobs ORDER BY id") == [
        ("billing:charge", "succeeded", "charged 5"),
        ("billing:charge", "succeeded", "charged 5"),
    ]


@pytest.mark.unit
def test_an_unknown_task_option_is_refused_where_it_is_written() -> None:
    """One declaration of the options (pgtq.tasks.TaskOptions) for both decorators; a typo is
    refused at the decorator, not when the blueprint is registered later."""
    bp = pgtq.Blueprint()
    with pytest.raises(pgtq.ConfigurationError, match=r"unknown option\(s\) \['quue'\]"):
        bp.task(quue="emails")(lambda: None)  # type: ignore[call-overload]
    app = pgtq.App("postgresql://nowhere/db")
    with pytest.raises(pgtq.ConfigurationError, match=r"unknown option\(s\) \['quue'\]"):
        app.task(quue="emails")(lambda: None)  # type: ignore[call-overload]
