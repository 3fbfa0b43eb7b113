"""Completion without polling: one LISTEN per app wakes every waiter of ``app.jobs.wait``,
``wait_many``, ``watch`` and their async twins.

A worker's completion announces the jobs that ended on the done channel (one NOTIFY per
statement, the ids in its payload, :meth:`pgtq.statements.Statements._announce_done`). A
:class:`Watcher` holds one LISTEN connection for all the waiters of its side: the sync one
(threads) listens on a thread of its own with psycopg, the async one in each event loop that
waits (asyncpg connections belong to their loop). A waiter registers its ids; a NOTIFY naming
one of them (or :data:`~pgtq.statements.DONE_MANY`) wakes it to re-read its jobs. While the
LISTEN connection is down (not opened yet, lost), the waiters poll with ``wait``'s old growing
delays, and the watcher reconnects; every change of state wakes them all. While it is up, one
statement every :data:`RECHECK_INTERVAL` reads which watched jobs ended anyway (ended with no
NOTIFY: ``release``, ``fail_unclaimable``, a worker with ``notify_completions=False``, plain
SQL), for all the waiters at once. The LISTEN ends :data:`LINGER` seconds after the last
waiter left, or at ``app.close()`` / ``close_async()``.

The completions announce jobs only while somebody listens: a watcher keeps a row of its own
in ``watchers`` (written when its LISTEN is up, before the re-check that follows, and again
every :data:`WATCHER_REFRESH`; deleted when it stops). A completion whose snapshot is older
than that row sends nothing; the re-check after the LISTEN came up, and every
:data:`RECHECK_INTERVAL` after, finds what it ended.

The state of a wait (:class:`Pending`) and the registry are plain data; only the two watchers
and the two wait loops in ``pgtq.jobs`` do I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from pgtq import statements
from pgtq.connectors import first_line
from pgtq.errors import JobNotFound
from pgtq.model import Job
from pgtq.retry import backoff_delays

if TYPE_CHECKING:
    from pgtq.app import App

logger = logging.getLogger("pgtq.watcher")

#: While listening, which watched jobs ended with no NOTIFY is read this often (one statement
#: for every waiter of the app): the longest a waiter can miss such an end.
RECHECK_INTERVAL = 1.0
#: The longest a watcher waits for notifications before it looks at its clock (a re-check
#: due, no waiter left, the app closing): a wake-up of a thread every half second at most.
TICK = 0.5
#: A waiter waits this long at most for its watcher's first LISTEN before it polls.
STARTING = 1.0
#: The LISTEN connection stays this long after the last waiter left (a web app's waits come
#: and go: not a connection per request).
LINGER = 5.0
#: A watcher's row in ``watchers`` lasts this long unless written again: what a process that
#: died without deleting it leaves the completions announcing for nothing, at most.
WATCHER_TTL = 30.0
#: A listening watcher writes its row again this often.
WATCHER_REFRESH = 10.0


class Waiter:
    """One wait: its ids, what the watcher heard of them since the last read, how to wake it.

    ``take()`` says what to read: the ids heard, or None for all of them (the first read, a
    :data:`~pgtq.statements.DONE_MANY`, the listener coming up or going down)."""

    __slots__ = ("_everything", "_heard", "_jobs", "_lock", "_wake", "ids")

    def __init__(self, ids: Iterable[int], wake: Callable[[], None]) -> None:
        self.ids = frozenset(ids)
        self._wake = wake
        self._heard: set[int] = set()
        self._jobs: list[Job] = []
        self._everything = True
        self._lock = threading.Lock()  # heard on the watcher's thread, taken on the waiter's

    def hear(self, ids: Iterable[int] | None) -> None:
        with self._lock:
            if ids is None:
                self._everything = True
            else:
                self._heard.update(ids)
        self._wake()

    def deliver(self, jobs: list[Job]) -> None:
        """Jobs the watcher read for this waiter (a NOTIFY named them): no read of its own."""
        with self._lock:
            self._jobs.extend(jobs)
        self._wake()

    def take(self) -> tuple[set[int] | None, list[Job]]:
        """What to read (the ids heard, None: all), and the jobs delivered read already."""
        with self._lock:
            heard, everything, jobs = self._heard, self._everything, self._jobs
            self._heard, self._everything, self._jobs = set(), False, []
        return (None if everything else heard), jobs


class Registry:
    """The waiters of one watcher, by job id; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, list[Waiter]] = {}
        self._waiters: set[Waiter] = set()
        #: When the last waiter left (monotonic), None while any waits.
        self.empty_since: float | None = time.monotonic()

    def __len__(self) -> int:
        return len(self._waiters)

    def add(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.add(waiter)
            self.empty_since = None
            for job_id in waiter.ids:
                self._by_id.setdefault(job_id, []).append(waiter)

    def remove(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)
            for job_id in waiter.ids:
                found = self._by_id.get(job_id)
                if found is not None:
                    with contextlib.suppress(ValueError):
                        found.remove(waiter)
                    if not found:
                        del self._by_id[job_id]
            if not self._waiters:
                self.empty_since = time.monotonic()

    def hear(self, ids: Sequence[int] | None) -> None:
        """Wake the waiters of ``ids`` (None: every waiter, to read all of its jobs)."""
        woken: list[tuple[Waiter, list[int] | None]]
        with self._lock:
            if ids is None:
                woken = [(w, None) for w in self._waiters]
            else:
                named: dict[Waiter, list[int]] = {}
                for job_id in ids:
                    for w in self._by_id.get(job_id, ()):
                        named.setdefault(w, []).append(job_id)
                woken = list(named.items())
        for waiter, heard in woken:
            waiter.hear(heard)

    def watching(self, ids: Iterable[int]) -> list[int]:
        """Which of ``ids`` a waiter waits for."""
        with self._lock:
            return [i for i in ids if i in self._by_id]

    def deliver(self, jobs: Iterable[Job]) -> None:
        """Hand each waiter the jobs of its ids (read once for all of them)."""
        with self._lock:
            given: dict[Waiter, list[Job]] = {}
            for job in jobs:
                for w in self._by_id.get(job.id, ()):
                    given.setdefault(w, []).append(job)
        for waiter, found in given.items():
            waiter.deliver(found)

    def wake_all(self) -> None:
        """Wake every waiter with nothing to read: to look at the watcher's state again."""
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.hear(())

    def watched(self) -> list[int]:
        with self._lock:
            return list(self._by_id)

    def idle_for(self, linger: float) -> bool:
        """No waiter for ``linger`` seconds."""
        since = self.empty_since
        return since is not None and time.monotonic() - since >= linger


class Pending:
    """What a wait still waits for, and the jobs that ended: pure, shared by both sides."""

    def __init__(self, ids: Iterable[int]) -> None:
        self.pending: set[int] = set(ids)
        self.ended: dict[int, Job] = {}
        #: The last state read of each pending job (for a timeout's message).
        self.seen: dict[int, Job] = {}

    @property
    def done(self) -> bool:
        return not self.pending

    def to_read(self, heard: set[int] | None) -> list[int]:
        """The ids to read now: those heard of that still pend, or all that pend."""
        return sorted(self.pending if heard is None else self.pending & heard)

    def take(self, read: Sequence[int], jobs: Sequence[Job | None]) -> list[Job]:
        """The jobs of ``read`` that ended, in the order they finished; JobNotFound for an id
        with no job (as ``wait`` says of one)."""
        found = {job.id: job for job in jobs if job is not None}
        ended: list[Job] = []
        for job_id in read:
            job = found.get(job_id)
            if job is None:
                raise JobNotFound(f"no job with id {job_id}")
            if job.status.is_final:
                self.pending.discard(job_id)
                self.seen.pop(job_id, None)
                self.ended[job_id] = job
                ended.append(job)
            else:
                self.seen[job_id] = job
        ended.sort(key=_finished)
        return ended

    def first_pending(self) -> tuple[int, Job | None]:
        job_id = min(self.pending)
        return job_id, self.seen.get(job_id)


def _finished(job: Job) -> tuple[float, int]:
    at = job.finished_at
    return (at.timestamp() if at is not None else float("inf"), job.id)


def read_jobs(s: statements.Statements, ids: list[int]) -> statements.Query[list[Job | None]]:
    """One read of the jobs ``ids``: ``get`` for one, a list for several (both sides)."""
    if len(ids) == 1:
        one = statements.get_job(s, ids[0])
        return statements.Query(one.statement, one.params, lambda rows: [one.mapper(rows)])
    found = statements.list_jobs(s, statements.Selection(ids=tuple(ids)), limit=len(ids))
    return cast("statements.Query[list[Job | None]]", found)


class Watcher:
    """The registry and the state both watchers share."""

    def __init__(self, app: App) -> None:
        self._app = app
        self.registry = Registry()
        #: The LISTEN is up: a waiter waits for a NOTIFY rather than polling.
        self.listening = False
        #: Its first LISTEN is being opened: waiters wait for it (up to :data:`STARTING`)
        #: rather than poll, so a thousand waiters arriving at once do not poll meanwhile.
        self.starting = False
        self._closing = False
        self._last_recheck = time.monotonic()
        #: This watcher's row in ``watchers``, and when it was last written.
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._said_at: float | None = None

    def _say_up(self) -> statements.Query[None]:
        """The statement saying this watcher listens (run before the re-check)."""
        self._said_at = time.monotonic()
        return statements.watcher_up(self._app.statements, self.id, WATCHER_TTL)

    def _say_down(self) -> statements.Query[None]:
        self._said_at = None
        return statements.watcher_down(self._app.statements, self.id)

    def _refresh_due(self) -> bool:
        said = self._said_at
        return said is not None and time.monotonic() - said >= WATCHER_REFRESH

    def on_notify(self, _channel: str, payload: str) -> None:
        """A NOTIFY of jobs that ended: the watched ones are read once, for all their
        waiters (:meth:`_read`); ``*``: every waiter reads its own."""
        ids = statements.parse_done(payload)
        if ids is None:
            self.registry.hear(None)
            return
        watched = self.registry.watching(ids)
        if watched:
            self._read(watched)

    def _read(self, ids: list[int]) -> None:
        raise NotImplementedError

    def _delivered(self, ids: list[int], jobs: list[Job | None]) -> None:
        found = [job for job in jobs if job is not None]
        self.registry.deliver(found)
        gone = set(ids) - {job.id for job in found}
        if gone:  # deleted: their waiters read for themselves (and say so)
            self.registry.hear(sorted(gone))

    def unregister(self, waiter: Waiter) -> None:
        self.registry.remove(waiter)

    def _up(self) -> None:
        """Listening: every waiter waits for NOTIFYs from now on (woken to see it). What
        ended while nobody listened is the re-check's, which the caller runs next: one
        statement for all, not a read per waiter."""
        self.listening, self.starting = True, False
        self.registry.wake_all()

    def _down(self) -> None:
        if self.listening or self.starting:
            self.listening = self.starting = False
            self.registry.hear(None)  # poll until it is back

    def _should_stop(self) -> bool:
        return self._closing or self.registry.idle_for(LINGER)

    def _recheck_due(self) -> bool:
        return len(self.registry) > 0 and time.monotonic() - self._last_recheck >= RECHECK_INTERVAL

    def _tick(self) -> float:
        """How long to wait for notifications before looking at the clock again."""
        return min(TICK, RECHECK_INTERVAL, LINGER)


class SyncWatcher(Watcher):
    """The sync side's watcher: LISTEN with psycopg on a daemon thread of its own."""

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()
        self._stop = threading.Event()

    def register(self, waiter: Waiter) -> None:
        with self._state:
            self.registry.add(waiter)
            if self._thread is None:
                self._closing = False
                self.starting = True
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="pgtq-watcher", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop listening (the thread ends within a tick); waiters left poll. Its row in
        ``watchers`` is deleted here, before the app's engine goes (not by the thread)."""
        with self._state:
            self._closing = True
            self._stop.set()
            if self._said_at is not None:
                self._run_quietly(self._say_down(), "saying the watcher stopped")
        self._down()

    def _run(self) -> None:
        delays = backoff_delays()
        conn: Any = None
        s = self._app.statements
        try:
            while True:
                with self._state:
                    if self._should_stop():
                        self._thread = None
                        return
                if conn is None:
                    try:
                        conn = self._app.sync.listen_connection(
                            self._app.listen_url, self._app.connect_timeout
                        )
                        conn.execute(f'LISTEN "{s.done_channel}"')
                    except Exception as exc:
                        _close_quietly(conn)
                        conn = None
                        self._down()
                        delay = next(delays)
                        logger.warning(
                            "LISTEN for waiters failed (%s); retrying in %.1f s",
                            first_line(exc),
                            delay,
                        )
                        self._stop.wait(delay)
                        continue
                    delays = backoff_delays()
                    self._say_up_unless_closing()
                    self._up()
                    self._recheck()
                try:
                    for note in conn.notifies(timeout=self._tick()):
                        self.on_notify(note.channel, note.payload)
                except Exception as exc:
                    logger.warning("the waiters' LISTEN connection was lost (%s)", first_line(exc))
                    _close_quietly(conn)
                    conn = None
                    self._down()
                    continue
                if self._refresh_due():
                    self._say_up_unless_closing()
                if self._recheck_due():
                    self._recheck()
        finally:
            self._down()
            with self._state:  # close() said it already, or the thread stops on its own
                if self._said_at is not None:
                    self._run_quietly(self._say_down(), "saying the watcher stopped")
            _close_quietly(conn)

    def _say_up_unless_closing(self) -> None:
        """Under the state lock: a row written after close() deleted it would outlive it."""
        with self._state:
            if not self._closing:
                self._run_quietly(self._say_up(), "saying the watcher listens")

    def _run_quietly(self, query: statements.Query[None], what: str) -> None:
        """A watcher's own row: a failure costs notifications (the re-checks still run)."""
        try:
            self._app.sync.run(query)
        except Exception as exc:
            logger.warning("%s failed: %s", what, first_line(exc))

    def _read(self, ids: list[int]) -> None:
        try:
            jobs = self._app.sync.run(read_jobs(self._app.statements, ids))
        except Exception as exc:
            logger.debug("reading the jobs that ended failed: %s", first_line(exc))
            self.registry.hear(ids)  # each waiter reads its own
            return
        self._delivered(ids, jobs)

    def _recheck(self) -> None:
        self._last_recheck = time.monotonic()
        watched = self.registry.watched()
        try:
            ended = self._app.sync.run(statements.ended_among(self._app.statements, watched))
        except Exception as exc:
            logger.debug("re-reading the watched jobs failed: %s", first_line(exc))
            return
        if ended:
            self.registry.hear(ended)


def _close_quietly(conn: Any) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


class AsyncWatcher(Watcher):
    """An event loop's watcher: LISTEN on the loop's connector (a connection of its own)."""

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self._task: asyncio.Task[None] | None = None
        self._to_read: set[int] = set()
        self._reading: asyncio.Task[None] | None = None

    def _read(self, ids: list[int]) -> None:
        """Read the named jobs: one read at a time, the NOTIFYs heard meanwhile in the next."""
        self._to_read.update(ids)
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._read_all())

    async def _read_all(self) -> None:
        try:
            while self._to_read:
                ids, self._to_read = sorted(self._to_read), set()
                try:
                    query = read_jobs(self._app.statements, ids)
                    jobs = await self._app.async_connector().run(query)
                except Exception as exc:
                    logger.debug("reading the jobs that ended failed: %s", first_line(exc))
                    self.registry.hear(ids)
                    continue
                self._delivered(ids, jobs)
        finally:
            self._reading = None

    def register(self, waiter: Waiter) -> None:
        self.registry.add(waiter)
        if self._task is None:
            self._closing = False
            self.starting = True
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pgtq-watcher")

    async def close(self) -> None:
        self._closing = True
        for task in (self._task, self._reading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._task = None
        self._down()

    async def _run(self) -> None:
        connector = self._app.async_connector()
        channel = self._app.statements.done_channel
        delays = backoff_delays()
        try:
            while not self._should_stop():
                try:
                    listener = await connector.listen([channel], self.on_notify)
                except Exception as exc:
                    delay = next(delays)
                    logger.warning(
                        "LISTEN for waiters failed (%s); retrying in %.1f s", first_line(exc), delay
                    )
                    await asyncio.sleep(delay)
                    continue
                delays = backoff_delays()
                await self._run_quietly(connector, self._say_up(), "saying the watcher listens")
                self._up()
                try:
                    await self._recheck(connector)
                    while not self._should_stop():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self._tick()):
                                await listener.lost.wait()
                        if listener.lost.is_set():
                            logger.warning("the waiters' LISTEN connection was lost")
                            break
                        if self._refresh_due():
                            await self._run_quietly(
                                connector, self._say_up(), "saying the watcher listens"
                            )
                        if self._recheck_due():
                            await self._recheck(connector)
                finally:
                    self._down()
                    await listener.close()
                    if self._said_at is not None:
                        down = self._say_down()
                        await self._run_quietly(connector, down, "saying the watcher stopped")
        finally:
            if self._task is asyncio.current_task():
                self._task = None
                if not self._closing and len(self.registry):  # came while it was stopping
                    self.register_again()

    @staticmethod
    async def _run_quietly(connector: Any, query: statements.Query[None], what: str) -> None:
        """A watcher's own row: a failure costs notifications (the re-checks still run)."""
        try:
            await connector.run(query)
        except Exception as exc:
            logger.warning("%s failed: %s", what, first_line(exc))

    def register_again(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pgtq-watcher")

    async def _recheck(self, connector: Any) -> None:
        self._last_recheck = time.monotonic()
        watched = self.registry.watched()
        try:
            ended = await connector.run(statements.ended_among(self._app.statements, watched))
        except Exception as exc:
            logger.debug("re-reading the watched jobs failed: %s", first_line(exc))
            return
        if ended:
            self.registry.hear(ended)


class Watchers:
    """An app's watchers: the sync one, and one per event loop that waits. None where the app
    does not listen (``listen_dsn=False``): its waiters poll."""

    def __init__(self, app: App) -> None:
        self._app = app
        self._sync: SyncWatcher | None = None
        self._lock = threading.Lock()
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncWatcher] = (
            weakref.WeakKeyDictionary()
        )

    def sync(self) -> SyncWatcher | None:
        if not self._app.listens:
            return None
        with self._lock:
            if self._sync is None:
                self._sync = SyncWatcher(self._app)
            return self._sync

    def for_loop(self) -> AsyncWatcher | None:
        if not self._app.listens:
            return None
        loop = asyncio.get_running_loop()
        found = self._loops.get(loop)
        if found is None:
            found = self._loops[loop] = AsyncWatcher(self._app)
        return found

    def close(self) -> None:
        with self._lock:
            found, self._sync = self._sync, None
        if found is not None:
            found.close()

    async def close_loop(self) -> None:
        found = self._loops.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found.close()
