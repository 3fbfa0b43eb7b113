"""Checked by mypy --strict from tests/test_factories.py (not collected by pytest).

The four forms ``pgtq.AppFactory`` accepts type-check; a factory returning something else
does not: each ``type: ignore`` below must be needed, or mypy (warn_unused_ignores, part of
--strict) reports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from types import TracebackType

import pgtq

app = pgtq.App("postgresql://localhost/x")


def make_app(env: str = "dev", *rest: str) -> pgtq.App:
    return app


@contextlib.contextmanager
def app_context() -> Iterator[pgtq.App]:
    yield app


@contextlib.asynccontextmanager
async def app_async_context(env: str) -> AsyncIterator[pgtq.App]:
    yield app


class Resources:
    """A hand-written context manager is accepted too."""

    def __enter__(self) -> pgtq.App:
        return app

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def returns_a_number() -> int:
    return 42


@contextlib.contextmanager
def yields_a_string() -> Iterator[str]:
    yield "not an app"


accepted: list[pgtq.AppFactory] = [app, make_app, app_context, app_async_context, Resources]


def sync_use() -> pgtq.App:
    with pgtq.open_app(make_app, "prod") as opened:
        return opened


async def async_use() -> pgtq.App:
    async with pgtq.open_app_async(app_async_context, "prod") as opened:
        return opened


rejected: pgtq.AppFactory = returns_a_number  # type: ignore[assignment]
also_rejected: pgtq.AppFactory = yields_a_string  # type: ignore[assignment]


def wrong_use() -> None:
    with pgtq.open_app(returns_a_number) as opened:  # type: ignore[arg-type]
        print(opened)
