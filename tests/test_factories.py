"""Worker factories: ``pgtq worker module:make_app -- ARGS``, ``pgtq.open_app`` and its async
twin, and the ``pgtq.AppFactory`` type (checked by running mypy on tests/typing/)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import pgtq
from pgtq import factories
from pgtq.cli import cli
from tests.apps import factories as examples
from tests.mypy_check import TYPING, errors_without_ignores, mypy

ROOT = Path(__file__).resolve().parent.parent
SQL = Callable[..., list[tuple[Any, ...]]]


@pytest.fixture(autouse=True)
def fresh_app_modules() -> Iterator[None]:
    yield
    for name in [m for m in sys.modules if m.startswith("tests.apps.")]:
        del sys.modules[name]


def lines(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def without_loops(log: Path) -> list[str]:
    return [re.sub(r" loop \S+", "", line) for line in lines(log)]


def defer_notes(dsn: str, *texts: str) -> list[int]:
    """Defer ``note`` jobs from another process's point of view: an app of its own."""
    app = pgtq.App(dsn)

    @app.task
    async def note(text: str) -> None: ...

    try:
        return note.defer_many([{"text": t} for t in texts])
    finally:
        app.close()


# -- open_app / open_app_async: the four forms ---------------------------------------------------


def forms(log: Path) -> dict[str, Any]:
    app = examples.build(log, "ready")
    return {
        "app": app,
        "function": examples.make_app,
        "context": examples.app_context,
        "async-context": examples.app_async_context,
    }


@pytest.mark.parametrize("form", ["function", "context"])
def test_open_app_gives_the_app_of_a_sync_factory(tmp_path: Path, form: str) -> None:
    log = tmp_path / "log"
    with pgtq.open_app(forms(log)[form], str(log)) as app:
        assert isinstance(app, pgtq.App)
        assert "note" in app.tasks
        inside = without_loops(log)
    assert inside[-1].startswith("built")
    if form == "context":
        assert inside[-2:] == ["enter sync", "built sync"]
        assert without_loops(log)[-1] == "exit sync"


def test_open_app_takes_an_app_as_it_is(tmp_path: Path) -> None:
    app = forms(tmp_path / "log")["app"]
    with pgtq.open_app(app) as opened:
        assert opened is app
    with pytest.raises(pgtq.ConfigurationError, match="only a factory takes arguments"):
        pgtq.open_app(app, "x").__enter__()


def test_open_app_sends_an_async_context_to_the_async_twin(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with (
        pytest.raises(pgtq.ConfigurationError, match="open_app_async"),
        pgtq.open_app(examples.app_async_context, str(log)),
    ):
        pass


@pytest.mark.parametrize("form", ["app", "function", "context", "async-context"])
async def test_open_app_async_takes_every_form(tmp_path: Path, form: str) -> None:
    log = tmp_path / "log"
    factory = forms(log)[form]
    args = () if form == "app" else (str(log),)
    async with pgtq.open_app_async(factory, *args) as app:
        assert isinstance(app, pgtq.App) and "note" in app.tasks
    if form == "async-context":
        assert without_loops(log)[-3:] == ["enter async", "built async", "exit async"]


@pytest.mark.parametrize(
    ("factory", "fragment"),
    [
        (examples.returns_a_number, "returned int, not a pgtq.App"),
        (examples.async_factory, "asynccontextmanager"),
        (42, "not a pgtq.App nor a factory"),
    ],
)
def test_a_factory_giving_something_else_is_named(
    tmp_path: Path, factory: Any, fragment: str
) -> None:
    with pytest.raises(pgtq.ConfigurationError, match=fragment) as info:
        factories.resolve_app(factory, str(tmp_path / "log"))
    if callable(factory):
        assert factory.__name__ in str(info.value)


def test_a_context_yielding_something_else_is_named() -> None:
    @contextlib.contextmanager
    def yields_a_string() -> Iterator[str]:
        yield "not an app"

    with (
        pytest.raises(pgtq.ConfigurationError, match="yields_a_string gave str"),
        pgtq.open_app(yields_a_string),  # type: ignore[arg-type]
    ):
        pass


async def test_run_worker_async_enters_the_context_around_the_worker(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGTQ_DSN", dsn)
    log = tmp_path / "log"
    defer_notes(dsn, "a", "b")
    stats = await factories.run_worker_async(examples.app_async_context, str(log), wait=False)
    assert stats.processed == 2
    assert without_loops(log) == ["enter async", "built async", "job a", "job b", "exit async"]


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "label"),
    [("make_app", "plain"), ("app_context", "sync"), ("app_async_context", "async")],
)
def test_pgtq_worker_with_a_factory_and_its_arguments(
    dsn: str, sql: SQL, tmp_path: Path, name: str, label: str
) -> None:
    log = tmp_path / "log"
    defer_notes(dsn, "one", "two")
    result = CliRunner().invoke(
        cli,
        ["worker", f"tests.apps.factories:{name}", "--one-shot", "--", str(log)],
        env={"PGTQ_DSN": dsn},
    )
    assert result.exit_code == 0, result.output
    assert "processed 2 job(s)" in result.stderr
    expected = {
        "plain": ["built plain", "job one", "job two"],
        "sync": ["enter sync", "built sync", "job one", "job two", "exit sync"],
        "async": ["enter async", "built async", "job one", "job two", "exit async"],
    }[label]
    assert sorted(without_loops(log)) == sorted(expected)
    assert without_loops(log)[0] == expected[0] and without_loops(log)[-1] == expected[-1]
    if label == "async":
        # The context was entered, the tasks ran and the context was exited on one loop.
        assert len({line.rsplit(" ", 1)[-1] for line in lines(log) if "loop" in line}) == 1
    assert sql("SELECT count(*) FROM pgtq.jobs WHERE status = 'succeeded'") == [(2,)]


def test_arguments_after_the_double_dash_may_look_like_options(dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    result = CliRunner().invoke(
        cli,
        ["worker", "tests.apps.factories:make_app", "--one-shot", "--", str(log), "--label-x"],
        env={"PGTQ_DSN": dsn},
    )
    assert result.exit_code == 0, result.output
    assert lines(log) == ["built --label-x"]


def test_a_factory_hands_its_resources_to_the_tasks_through_the_worker_state(
    dsn: str, sql: SQL, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    app = pgtq.App(dsn)

    @app.task
    async def fetch(url: str) -> None: ...

    fetch.defer_many([{"url": "/a"}, {"url": "/b"}])
    app.close()
    result = CliRunner().invoke(
        cli,
        ["worker", "tests.apps.factories:with_resources", "--one-shot", "-c", "1", "--", str(log)],
        env={"PGTQ_DSN": dsn},
    )
    assert result.exit_code == 0, result.output
    assert lines(log) == [
        "client opened",
        "worker started, client shared: True",
        "fetched /a with the shared client",
        "fetched /b with the shared client",
        "client closed after 2 request(s)",
    ]
    assert sql("SELECT result FROM pgtq.jobs ORDER BY id") == [(1,), (2,)]


def test_options_given_to_the_worker_win_over_the_apps_defaults(dsn: str) -> None:
    app = pgtq.App(dsn)
    seen: list[str] = []
    app.worker_options.update(state="default state", startup_hooks=[seen.append])
    app.run_worker(wait=False, install_signal_handlers=False)
    app.run_worker(wait=False, install_signal_handlers=False, state="given state")
    app.close()
    assert seen == ["default state", "given state"]


@pytest.mark.parametrize(
    ("path", "args", "fragment"),
    [
        ("tests.apps.basic:app", ["x"], "only a factory takes arguments"),
        ("tests.apps.basic:not_an_app", [], "not a pgtq.App"),
        ("tests.apps.factories:returns_a_number", ["log"], "returned int"),
    ],
)
def test_a_bad_factory_is_one_clear_line(
    dsn: str, path: str, args: list[str], fragment: str
) -> None:
    result = CliRunner().invoke(
        cli, ["worker", path, "--one-shot", "--", *args], env={"PGTQ_DSN": dsn}
    )
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    assert fragment in errors[0]


def test_other_commands_want_the_app_itself(dsn: str) -> None:
    result = CliRunner().invoke(
        cli, ["defer", "tests.apps.factories:make_app", "note", "{}"], env={"PGTQ_DSN": dsn}
    )
    assert result.exit_code == 1
    assert "only `pgtq worker` calls app factories" in " ".join(result.stderr.split())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["app_context", "app_async_context"])
def test_sigterm_stops_the_worker_then_exits_the_context(
    dsn: str, sql: SQL, tmp_path: Path, name: str
) -> None:
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "PGTQ_DSN"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgtq", "worker", f"tests.apps.factories:{name}", "--dsn", dsn,
         "--", str(log)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        defer_notes(dsn, "before the signal")
        deadline = time.monotonic() + 30
        while not any(line.startswith("job") for line in lines(log)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the worker did not run the job"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    kind = "async" if "async" in name else "sync"
    assert without_loops(log) == [
        f"enter {kind}",
        f"built {kind}",
        "job before the signal",
        f"exit {kind}",
    ]
    assert sql("SELECT count(*) FROM pgtq.workers") == [(0,)]


# -- the type: checked by mypy -------------------------------------------------------------------


@pytest.mark.slow
def test_app_factory_type_accepts_the_four_forms_and_rejects_others(tmp_path: Path) -> None:
    usage = TYPING / "factories_usage.py"
    checked = mypy(usage)
    # Every form type-checks, and every `type: ignore` on a wrong one is needed (--strict
    # reports an unused one): the wrong factories are rejected.
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Without the ignores, mypy names each wrong factory.
    errors = errors_without_ignores(usage, tmp_path)
    assert len(errors) == 3, errors
    assert any('"Callable[[], int]"' in e and '"open_app"' in e for e in errors), errors
    assert sum('"AppFactory"' in e or "App | Callable" in e for e in errors) >= 2, errors
