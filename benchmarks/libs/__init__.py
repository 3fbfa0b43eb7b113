"""One adapter per library, each with the same small interface (``base.Adapter``)."""

from __future__ import annotations

from benchmarks.libs.base import Adapter
from benchmarks.libs.pgqueuer_lib import PgqueuerAdapter
from benchmarks.libs.pgtq_lib import PgtqAdapter
from benchmarks.libs.procrastinate_lib import ProcrastinateAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    a.name: a for a in (PgtqAdapter, PgqueuerAdapter, ProcrastinateAdapter)
}


def get(name: str) -> Adapter:
    return ADAPTERS[name]()
