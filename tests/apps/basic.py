"""A small app as a user would write it: no DSN in the code (it comes from the CLI or env)."""

from __future__ import annotations

import pgtq

app = pgtq.App()

not_an_app = 42


@app.task()
def add(ctx: pgtq.JobContext, a: int, b: int) -> int:
    return a + b


@app.task(queue="greetings")
async def greet(name: str) -> str:
    return f"hello {name}"
