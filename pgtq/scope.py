"""What a worker's units share (claims, runner, heartbeat): one value instead of the same
four arguments to each."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgtq.app import App
    from pgtq.connectors import AsyncConnector


@dataclass(frozen=True, slots=True)
class WorkerScope:
    """A worker's app and connector, its id, and the queues it serves (None: all).

    ``worker_id`` is a function: a worker declared dead goes on under a new id, and every
    unit must write under the current one.
    """

    app: App
    connector: AsyncConnector
    worker_id: Callable[[], str]
    queues: Sequence[str] | None = None
