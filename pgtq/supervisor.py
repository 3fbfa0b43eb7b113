"""``pgtq worker --processes N``: N worker processes under one small supervisor.

Each child is a fresh ``python -m pgtq worker ...`` with the command's own arguments, less
``--processes``: a full worker (its own worker id, heartbeat, claim/LISTEN/completer
connections, thread pool), started by ``exec`` rather than ``fork``, so no engine, socket or
thread of the supervisor is ever inherited. The supervisor opens no connection and runs no
SQL: it starts the children, forwards SIGTERM/SIGINT to them (each shuts down as a single
worker does; a second signal hurries them), restarts a child that dies with a non-zero status
after a backoff (:class:`RestartPolicy`, pure), and exits once every child has: 0, or 1 when a
child failed and was not restarted.

Children run in process groups of their own, so a terminal's Ctrl-C reaches the supervisor
alone and each child gets exactly one forwarded SIGINT (two would mean "stop now"); on Linux
a child also gets SIGTERM if the supervisor itself dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pgtq.errors import ConfigurationError

__all__ = [
    "FLAG",
    "Done",
    "GiveUp",
    "Restart",
    "RestartPolicy",
    "Supervisor",
    "child_args",
    "run_processes",
]

logger = logging.getLogger("pgtq.supervisor")

#: The option that asks for a supervisor; its children are run without it.
FLAG = "--processes"
#: The signals forwarded to the children.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# -- the pure parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Restart:
    """Start the child again in ``delay`` seconds; ``streak``: its quick failures in a row."""

    delay: float
    streak: int


@dataclass(frozen=True)
class Done:
    """The child is not started again; ``failed``: it ended in a way that makes the run fail."""

    failed: bool


@dataclass(frozen=True)
class GiveUp:
    """The child failed quickly ``streak`` times in a row: stop the others, exit 1."""

    streak: int


Decision = Restart | Done | GiveUp


@dataclass(frozen=True)
class RestartPolicy:
    """When a child that exited is started again.

    A child that exits 0 (``--one-shot`` drained, or it was stopped by itself) is done. One
    that exits otherwise (an exception, a crash, SIGKILL, the OOM killer) is restarted after
    ``first_delay * factor ** (failures in a row - 1)``, at most ``max_delay``; a child
    that lived ``reset_after`` seconds starts a new streak. ``give_up_after`` quick failures
    in a row (a bad configuration, a database that does not answer at start) stop the
    supervisor with status 1, as a single worker exits 1 then: a service manager restarts it,
    a one-shot run ends instead of looping. While stopping nothing is restarted.
    """

    first_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    reset_after: float = 30.0
    give_up_after: int = 5

    def delay(self, streak: int) -> float:
        """Seconds before the restart that follows the ``streak``-th failure in a row."""
        return float(min(self.max_delay, self.first_delay * self.factor ** max(0, streak - 1)))

    def decide(
        self, code: int, lived: float, streak: int, forwarded: frozenset[int] = frozenset()
    ) -> Decision:
        """What follows a child's exit with status ``code`` (``-N``: killed by signal N) after
        ``lived`` seconds, ``streak`` failures in a row before it; ``forwarded``: the stop
        signals sent to the children so far (none: not stopping)."""
        if forwarded:
            # Stopping: a child that had no handler yet dies of the signal it was sent.
            stopped = {-s for s in forwarded} | {128 + s for s in forwarded}
            return Done(failed=code != 0 and code not in stopped)
        if code == 0:
            return Done(failed=False)
        streak = 1 if lived >= self.reset_after else streak + 1
        if streak >= self.give_up_after:
            return GiveUp(streak)
        return Restart(self.delay(streak), streak)


def child_args(
    args: Sequence[str],
    index: int,
    generation: int = 0,
    *,
    name: str | None = None,
    metrics_port: int | None = None,
) -> list[str]:
    """The ``pgtq`` arguments of child ``index`` (from 1): ``args`` (the supervisor's own,
    root options included) less ``--processes N``. What must differ per child is appended
    before a ``--`` (the last value of an option wins): ``--name NAME-i`` (``NAME-i.g`` for its
    ``g``-th restart: the dead one's id stays in the workers table until it is rescued) and
    ``--metrics-port P+i-1`` (0 stays 0: each child its own free port)."""
    end = args.index("--") if "--" in args else len(args)
    head, tail = list(args[:end]), list(args[end:])
    kept: list[str] = []
    found = False
    skip = False
    for arg in head:
        if skip:
            skip = False
        elif arg == FLAG:
            found = skip = True
        elif arg.startswith(FLAG + "="):
            found = True
        else:
            kept.append(arg)
    if not found:
        raise ConfigurationError(
            f"{FLAG} N runs `python -m pgtq` again with the command's own arguments, which "
            f"are not in sys.argv here ({' '.join(args) or 'none'}): use it from the command line"
        )
    if name is not None:
        kept += ["--name", f"{name}-{index}" + (f".{generation}" if generation else "")]
    if metrics_port is not None:
        kept += ["--metrics-port", str(metrics_port + index - 1 if metrics_port else 0)]
    return kept + tail


# -- the supervisor --------------------------------------------------------------------------


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    generation: int = 0
    streak: int = 0
    due: float | None = None  # when to start it (again)
    failed: bool = False

    @property
    def active(self) -> bool:
        return self.process is not None or self.due is not None


class Supervisor:
    """Runs ``processes`` children, ``command(index, generation)`` each, until all are done.

    Single-threaded, no event loop: signal handlers only note the signal, and the main loop
    sleeps in ``select`` on the signal wake-up pipe (SIGCHLD, SIGTERM, SIGINT) with the time
    to the next restart as its timeout.
    """

    def __init__(
        self,
        command: Callable[[int, int], list[str]],
        processes: int,
        policy: RestartPolicy = RestartPolicy(),
    ) -> None:
        if processes < 1:
            raise ConfigurationError(f"{FLAG} must be at least 1, not {processes}")
        self._command = command
        self._policy = policy
        self._children = [_Child(i, due=0.0) for i in range(1, processes + 1)]
        self._forwarded: set[int] = set()
        self._signals: list[int] = []

    def run(self) -> int:
        """Start the children, supervise them until all are done; the exit status."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old = {sig: signal.signal(sig, self._noted) for sig in (*STOP_SIGNALS, signal.SIGCHLD)}
        try:
            while True:
                self._forward()
                self._reap()
                self._forward()  # a give-up stops the others
                self._start_due()
                if not any(child.active for child in self._children):
                    break
                select.select([wake_r], [], [], self._timeout())
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(old_wakeup)
            os.close(wake_r)
            os.close(wake_w)
        failed = [child.index for child in self._children if child.failed]
        return 1 if failed else 0

    def _noted(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _forward(self) -> None:
        """Send each noted stop signal to every running child; nothing is (re)started after."""
        while self._signals:
            sig = self._signals.pop(0)
            first = not self._forwarded
            self._forwarded.add(sig)
            running = [c for c in self._children if c.process is not None]
            logger.info(
                "%s sent to %s worker process(es): %s",
                signal.Signals(sig).name,
                len(running),
                "they stop (running jobs get the grace period)"
                if first
                else "they stop now (running jobs go back)",
                extra={"signal": signal.Signals(sig).name},
            )
            for child in self._children:
                child.due = None  # a pending restart is off
                if child.process is not None:
                    with contextlib.suppress(ProcessLookupError):
                        child.process.send_signal(sig)

    def _reap(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.process is None:
                continue
            code = child.process.poll()
            if code is None:
                continue
            pid = child.process.pid
            child.process = None
            self._exited(child, code, now - child.started, pid, now)

    def _exited(self, child: _Child, code: int, lived: float, pid: int | None, now: float) -> None:
        decision = self._policy.decide(code, lived, child.streak, frozenset(self._forwarded))
        how = _describe_exit(code)
        extra = {"child": child.index, "pid": pid, "exit_code": code, "lived": round(lived, 3)}
        if isinstance(decision, Restart):
            child.streak, child.due = decision.streak, now + decision.delay
            logger.warning(
                "worker process %s (pid %s) %s after %.1f s: restarting in %.1f s",
                child.index,
                pid,
                how,
                lived,
                decision.delay,
                extra=extra,
            )
        elif isinstance(decision, GiveUp):
            child.failed = True
            logger.error(
                "worker process %s (pid %s) %s after %.1f s, %s failures in a "
                "row: giving up, stopping the others",
                child.index,
                pid,
                how,
                lived,
                decision.streak,
                extra=extra,
            )
            if not self._forwarded:
                self._signals.append(signal.SIGTERM)
        else:
            child.failed = decision.failed
            log = logger.warning if decision.failed else logger.info
            log(
                "worker process %s (pid %s) %s after %.1f s",
                child.index,
                pid,
                how,
                lived,
                extra=extra,
            )

    def _start_due(self) -> None:
        now = time.monotonic()
        for child in self._children:
            if child.due is None or child.due > now or self._forwarded:
                continue
            child.due = None
            restart = child.generation > 0 or child.streak > 0
            command = self._command(child.index, child.generation)
            child.generation += 1
            child.started = time.monotonic()
            try:
                child.process = _spawn(command)
            except OSError as exc:
                logger.error("cannot start worker process %s: %s", child.index, exc)
                self._exited(child, 1, 0.0, None, child.started)
                continue
            logger.info(
                "worker process %s %s (pid %s)",
                child.index,
                "restarted" if restart else "started",
                child.process.pid,
                extra={"child": child.index, "pid": child.process.pid},
            )

    def _timeout(self) -> float | None:
        """Seconds until the next restart is due (None: none is, wait for a signal)."""
        dues = [child.due for child in self._children if child.due is not None]
        return max(0.0, min(dues) - time.monotonic()) if dues else None


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    """A child in a process group of its own (a terminal's Ctrl-C reaches the supervisor
    only), its stdin closed, its stdout and stderr the supervisor's."""
    parent = os.getpid()
    preexec = _die_with_parent(parent) if sys.platform == "linux" else None
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0, preexec_fn=preexec)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """Linux: the child gets SIGTERM when the supervisor dies (killed outright: no orphaned
    workers), or exits at once if it already has."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def die_with_parent() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return die_with_parent


def run_processes(
    processes: int,
    args: Sequence[str],
    *,
    name: str | None = None,
    metrics_port: int | None = None,
    policy: RestartPolicy = RestartPolicy(),
) -> int:
    """``pgtq worker --processes N``: ``args`` are the command's (``sys.argv[1:]``); each
    child runs ``python -m pgtq`` with them, less ``--processes`` (:func:`child_args`)."""
    child_args(args, 1, name=name, metrics_port=metrics_port)  # refuses args without the flag

    def command(index: int, generation: int) -> list[str]:
        own = child_args(args, index, generation, name=name, metrics_port=metrics_port)
        return [sys.executable, "-m", "pgtq", *own]

    logger.info(
        "starting %s worker processes (pid %s)",
        processes,
        os.getpid(),
        extra={"processes": processes},
    )
    code = Supervisor(command, processes, policy).run()
    logger.info("all worker processes ended, exit status %s", code)
    return code
