"""Checked by mypy --strict from tests/test_typing.py (not collected by pytest).

``defer`` takes exactly the task's keyword arguments (a ``JobContext`` first parameter left
out) and ``jobs.wait`` returns what the task returns. Each ``type: ignore`` below must be
needed, or mypy (warn_unused_ignores, part of --strict) reports it: the wrong calls are
rejected.
"""

from __future__ import annotations

import pgtq

app = pgtq.App("postgresql://localhost/x")


@app.task
def add(a: int, b: int) -> int:
    return a + b


@app.task(queue="mail", retry=3)
def send(ctx: pgtq.JobContext, to: str, cc: list[str] | None = None) -> str:
    return to


@app.task
async def fetch(url: str) -> bytes:
    return b""


def checked() -> None:
    total: int = app.jobs.wait(add.defer(a=1, b=2))
    sent: str = app.jobs.wait(send.configure(priority=5).defer(to="a@example.com"))
    send.defer(to="a@example.com", cc=["b@example.com"])
    add.defer(a=1, b=2, connection=None)  # with connection=: not checked, accepted
    plain_id: int = add.defer(a=1, b=2)
    print(total, sent, plain_id)


async def checked_async() -> None:
    body: bytes = await app.jobs.wait_async(await fetch.defer_async(url="https://x"))
    print(body)


def rejected() -> None:
    add.defer(a="one", b=2)  # type: ignore[call-overload]
    add.defer(a=1, c=3)  # type: ignore[call-overload]
    send.defer(to=1)  # type: ignore[call-overload]
    send.defer(ctx=None, to="a")  # type: ignore[call-overload]
    name: str = app.jobs.wait(add.defer(a=1, b=2))  # type: ignore[assignment]
    print(name)
