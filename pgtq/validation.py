"""What a caller may pass to ``defer`` and ``configure``: one pure check per concern.

A value that reaches an index, a timestamp or a ``jsonb`` column and that PostgreSQL (or a
claim) cannot handle would not fail alone: a 3 kB ``lock`` makes every claim of every worker
fail, an ``-infinity`` schedule breaks every claim and read. So every value is checked here,
before anything is written, the same way for the sync and the async API (both go through
``Task.configure`` and ``Deferrer.encode``). Each error is :class:`pgtq.InvalidArguments`
and its message starts with the field it is about (``"queue: ..."``).

No I/O here, and no SQLAlchemy: the checks are plain functions over plain values.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from numbers import Real
from typing import Any

from pgtq.errors import InvalidArguments
from pgtq.model import dumps, unstorable_json

#: Longest queue (and task) name, in UTF-8 bytes. A queue name is a NOTIFY payload (at most
#: 8000 bytes) and a key of the claim index: a longer one could never be retried.
NAME_MAX_BYTES = 255
#: Longest ``lock``, ``queueing_lock`` and ``concurrency_key``, in UTF-8 bytes: each is a key
#: of a btree index, whose entries PostgreSQL caps at ~2700 bytes (a longer key fails every
#: claim, not just its own job). Hash a longer key to fit.
KEY_MAX_BYTES = 1024
#: ``priority`` is a PostgreSQL ``integer`` (int4).
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
#: The window a job may be scheduled in: from this instant to this far ahead of now.
SCHEDULE_EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
SCHEDULE_HORIZON = timedelta(days=36_525)  # ~100 years
_HORIZON_SECONDS = SCHEDULE_HORIZON.total_seconds()
#: Deepest nesting of a job's arguments (its keyword arguments are level 1). The worker
#: decodes arguments on a deeper Python stack than ``defer`` encodes them: arguments near
#: the interpreter's recursion limit would encode here and fail in every claim there.
ARGS_MAX_DEPTH = 200
#: ``App(max_args_bytes=...)``'s default: a job's arguments as JSON, at most 1 MB.
DEFAULT_MAX_ARGS_BYTES = 1_000_000

KEY_FIELDS = ("lock", "queueing_lock", "concurrency_key")


def _text(field: str, value: object, max_bytes: int) -> str:
    """A non-empty ``str`` of at most ``max_bytes`` UTF-8 bytes that PostgreSQL can store."""
    if not isinstance(value, str):
        raise InvalidArguments(f"{field}: must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidArguments(f"{field}: must not be empty")
    if len(value) > max_bytes:  # each character is at least a byte: no need to encode
        raise InvalidArguments(
            f"{field}: at most {max_bytes} bytes (UTF-8), got {len(value):,} characters"
        )
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArguments(
            f"{field}: contains an unpaired surrogate (not valid UTF-8)"
        ) from None
    if size > max_bytes:
        raise InvalidArguments(f"{field}: at most {max_bytes} bytes (UTF-8), got {size:,}")
    if "\x00" in value:
        raise InvalidArguments(f"{field}: contains a NUL character (\\x00)")
    return value


def check_name(field: str, value: object) -> str:
    """A queue or task name: non-empty, at most :data:`NAME_MAX_BYTES`."""
    return _text(field, value, NAME_MAX_BYTES)


def check_queue(value: object) -> str:
    return check_name("queue", value)


def check_key(field: str, value: object) -> str | None:
    """``lock``, ``queueing_lock`` or ``concurrency_key``: None, or a non-empty string of at
    most :data:`KEY_MAX_BYTES`."""
    return None if value is None else _text(field, value, KEY_MAX_BYTES)


def check_priority(value: object) -> int:
    """An ``int`` (or anything with ``__index__``, e.g. a numpy integer) in int4's range.

    Floats are refused, even integral ones: PostgreSQL would round 1.5 one way and a driver
    truncate it another, and a float priority is most likely a mistake.
    """
    if isinstance(value, bool):
        raise InvalidArguments("priority: must be an integer, got bool")
    try:
        priority = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArguments(
            f"priority: must be an integer, got {type(value).__name__}"
        ) from None
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidArguments(
            f"priority: must be within [{PRIORITY_MIN}, {PRIORITY_MAX}] (PostgreSQL integer), "
            f"got {priority}"
        )
    return priority


def check_schedule_at(value: object, *, now: datetime | None = None) -> datetime:
    """A timezone-aware datetime from :data:`SCHEDULE_EARLIEST` to :data:`SCHEDULE_HORIZON`
    ahead of ``now`` (this machine's clock: the window is coarse enough for any skew)."""
    if not isinstance(value, datetime):
        raise InvalidArguments(f"schedule_at: must be a datetime, got {type(value).__name__}")
    if value.utcoffset() is None:
        raise InvalidArguments(
            "schedule_at: must be timezone-aware (e.g. datetime.now(timezone.utc))"
        )
    latest = (now or datetime.now(UTC)) + SCHEDULE_HORIZON
    if not SCHEDULE_EARLIEST <= value <= latest:
        raise InvalidArguments(
            f"schedule_at: must be between {SCHEDULE_EARLIEST:%Y-%m-%d} and "
            f"{SCHEDULE_HORIZON.days // 365} years from now, got {value.isoformat()}"
        )
    return value


def schedule_seconds(value: object) -> float:
    """``schedule_in`` as seconds from the database server's ``now()``: a finite number or a
    timedelta, at most :data:`SCHEDULE_HORIZON`. A negative delay means due now (0): a
    deadline that has just passed runs at once, as a ``schedule_at`` in the past does."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, Real) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    else:
        raise InvalidArguments(
            f"schedule_in: must be a number of seconds or a timedelta, got {type(value).__name__}"
        )
    if not -_HORIZON_SECONDS <= seconds <= _HORIZON_SECONDS:  # also false for NaN
        raise InvalidArguments(
            f"schedule_in: must be a finite delay within {SCHEDULE_HORIZON.days // 365} years, "
            f"got {value!r}"
        )
    return max(seconds, 0.0)


#: What a defer with a ``queueing_lock`` does when a job with that key is already waiting.
ON_CONFLICT = ("raise", "skip", "replace")


def check_on_conflict(value: object, queueing_lock: str | None) -> str:
    """``configure(on_conflict=...)``: one of :data:`ON_CONFLICT`, and only with a key."""
    if value not in ON_CONFLICT:
        raise InvalidArguments(
            f"on_conflict: must be one of {', '.join(ON_CONFLICT)}, got {value!r}"
        )
    if value != "raise" and queueing_lock is None:
        raise InvalidArguments(f"on_conflict: {value!r} needs a queueing_lock to conflict on")
    return str(value)


def check_unique_for(value: object, queueing_lock: str | None) -> float:
    """``configure(unique_for=...)``: a period (seconds or a timedelta) over zero and within
    :data:`SCHEDULE_HORIZON`, and only with a ``queueing_lock`` (the key it makes unique)."""
    seconds = _period("unique_for", value, "a period over zero")
    if queueing_lock is None:
        raise InvalidArguments("unique_for: needs a queueing_lock, the key it makes unique")
    return seconds


def _period(field: str, value: object, what: str) -> float:
    """Seconds (a number, not a bool) or a timedelta, over zero and within
    :data:`SCHEDULE_HORIZON`; else ``InvalidArguments`` naming ``field``."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, Real):
        raise InvalidArguments(
            f"{field}: must be a timedelta or a number of seconds, got {type(value).__name__}"
        )
    if not 0 < float(seconds) <= _HORIZON_SECONDS:  # also false for NaN
        raise InvalidArguments(f"{field}: must be {what}, got {value!r}")
    return float(seconds)


#: Most tags a job may have (``configure(tags=...)``): tags label a job for people and
#: filters (a GIN index holds them), not a place for data (``meta`` is).
MAX_TAGS = 50


def check_tags(value: object) -> tuple[str, ...] | None:
    """``configure(tags=...)``: None, or a sequence (not a string) of non-empty strings of at
    most :data:`KEY_MAX_BYTES` each, at most :data:`MAX_TAGS` of them once repeats are
    dropped. Repeats are dropped, the first kept (a tag is a label: a repeated one says
    nothing more); no tag at all is stored as none (NULL: out of the tags' index)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArguments(
            f"tags: must be a list (or tuple) of strings, got {type(value).__name__}"
            + (": a single tag is written tags=[tag]" if isinstance(value, str) else "")
        )
    tags = tuple(
        dict.fromkeys(_text(f"tags (tag {i})", t, KEY_MAX_BYTES) for i, t in enumerate(value))
    )
    if len(tags) > MAX_TAGS:
        raise InvalidArguments(f"tags: at most {MAX_TAGS} different tags, got {len(tags)}")
    return tags or None


def check_meta(
    value: object, max_bytes: int | None, dumps: Callable[[Any], str] = dumps
) -> dict[str, Any] | None:
    """``configure(meta=...)``: None, or a mapping that encodes as a JSON object ``jsonb``
    stores, nested at most :data:`ARGS_MAX_DEPTH` deep and at most ``max_bytes`` long (the
    app's ``max_args_bytes``): the bounds of a job's arguments, for the same reasons. The
    stored value is the JSON read back (a copy: later changes to the mapping are not stored;
    a datetime is its ISO text, as in arguments). ``dumps``: the app's encoder."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArguments(
            f"meta: must be a mapping (a JSON object), got {type(value).__name__}"
        )
    try:
        encoded = dumps(value)
    except RecursionError:
        raise InvalidArguments(f"meta: nested more than {ARGS_MAX_DEPTH} levels deep") from None
    except Exception as exc:  # TypeError, ValueError, or whatever a hook of yours raises
        raise InvalidArguments(f"meta: must be JSON-serializable: {exc}") from None
    if (
        encoded.count("[") + encoded.count("{") > ARGS_MAX_DEPTH
        and _depth(value, ARGS_MAX_DEPTH + 1) > ARGS_MAX_DEPTH
    ):
        raise InvalidArguments(f"meta: nested more than {ARGS_MAX_DEPTH} levels deep")
    reason = unstorable_json(encoded)
    if reason:
        raise InvalidArguments(f"meta: {reason}, which jsonb refuses")
    if max_bytes is not None and len(encoded) > max_bytes:
        raise InvalidArguments(
            f"meta: {len(encoded):,} bytes as JSON, more than the app's max_args_bytes "
            f"({max_bytes:,})"
        )
    decoded: dict[str, Any] = json.loads(encoded)
    return decoded


def check_timeout(value: object) -> float:
    """``configure(timeout=...)``: this job's own time limit, a timedelta or a number of
    seconds over zero and within :data:`SCHEDULE_HORIZON` (a bool is no number here)."""
    return _period("timeout", value, "a number of seconds over zero")


def check_max_attempts(value: object) -> int:
    """``configure(max_attempts=...)``: this job's own attempt budget, an ``int`` (not a bool,
    not a float) from 1 to int4's maximum (the column is a PostgreSQL ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArguments(f"max_attempts: must be a whole number, got {type(value).__name__}")
    if not 1 <= value <= PRIORITY_MAX:
        raise InvalidArguments(f"max_attempts: must be from 1 to {PRIORITY_MAX}, got {value}")
    return value


def check_delay(field: str, value: object) -> float:
    """A delay a task or its retry policy decides (``Snooze(seconds)``,
    ``RetryDecision(delay=...)``): a finite number of seconds from 0 to
    :data:`SCHEDULE_HORIZON`, so the time it gives stays in PostgreSQL's range."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidArguments(f"{field}: must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)
    if not 0 <= seconds <= _HORIZON_SECONDS:  # also false for NaN
        raise InvalidArguments(
            f"{field}: must be from 0 to {SCHEDULE_HORIZON.days // 365} years in seconds, "
            f"got {value!r}"
        )
    return seconds


def check_max_args_bytes(value: object) -> int | None:
    """``App(max_args_bytes=...)``: None (no cap) or a positive int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArguments(f"max_args_bytes: must be a positive int or None, got {value!r}")
    return value


# -- arguments ----------------------------------------------------------------------------------


def encode_arguments(
    jobs: Sequence[Mapping[str, Any]],
    max_bytes: int | None,
    dumps: Callable[[Any], str] = dumps,
) -> str:
    """The jobs' keyword arguments as one JSON array, checked: each job's JSON storable by
    ``jsonb``, at most :data:`ARGS_MAX_DEPTH` deep and ``max_bytes`` long.

    ``dumps``: the app's encoder (``App(encoder=)``; pgtq's own by default), whose
    ``default=`` hook writes datetimes, UUIDs, ... (:mod:`pgtq.codecs`): plain JSON values
    never reach it. The common case costs one C encoder call and a few substring scans of
    the encoded text: only a text that may hold a problem is looked at job by job (to name
    the job and the value).
    """
    try:
        encoded = dumps(jobs)
    except RecursionError:
        encoded = ""  # deeper than the interpreter allows: the depth check names the job
    except Exception as exc:  # TypeError, ValueError, or whatever a hook of yours raises
        raise _unencodable_error(jobs, dumps, exc) from None
    # A job nests at most as deep as it has brackets; the array and each job's own object
    # account for ``len(jobs) + 1`` of them.
    if not encoded or encoded.count("[") + encoded.count("{") - len(jobs) > ARGS_MAX_DEPTH:
        _check_depth(jobs)
        if not encoded:
            raise InvalidArguments("arguments: nested too deeply to encode")
    # What jsonb refuses (NUL, unpaired surrogates), the worker's own test of its outcomes:
    # two substring scans of the text unless it holds such an escape.
    if unstorable_json(encoded):
        for i, kwargs in enumerate(jobs):
            reason = unstorable_json(dumps(kwargs))
            if reason:
                raise InvalidArguments(f"arguments{_job(jobs, i)}: {reason}, which jsonb refuses")
    if max_bytes is not None and len(encoded) > max_bytes + 2:  # ASCII: a char is a byte
        _check_sizes(jobs, max_bytes, dumps)
    return encoded


def _job(jobs: Sequence[Any], i: int | None) -> str:
    """Which job of a ``defer_many`` call (nothing for a single job)."""
    return f" (job {i} of {len(jobs)})" if i is not None and len(jobs) > 1 else ""


def _unencodable_error(
    jobs: Sequence[Mapping[str, Any]], dumps: Callable[[Any], str], exc: Exception
) -> InvalidArguments:
    """The error of arguments the encoder refused, naming the job and the argument (only
    now, on the error path, is each encoded alone)."""
    for i, kwargs in enumerate(jobs):
        if not _fails(dumps, kwargs):
            continue
        items = kwargs.items() if isinstance(kwargs, Mapping) else ()
        for name, value in items:
            error = _fails(dumps, value)
            if error is not None and not isinstance(error, RecursionError):
                return InvalidArguments(
                    f"arguments{_job(jobs, i)}: must be JSON-serializable (argument "
                    f"{name!r}): {error}"
                )
        return InvalidArguments(f"arguments{_job(jobs, i)}: must be JSON-serializable: {exc}")
    return InvalidArguments(f"arguments: must be JSON-serializable: {exc}")


def _fails(dumps: Callable[[Any], str], value: Any) -> Exception | None:
    try:
        dumps(value)
    except Exception as exc:
        return exc
    return None


def _depth(value: Any, limit: int) -> int:
    """The nesting depth of a value (a scalar is 0), counted no further than ``limit``."""
    if isinstance(value, Mapping):
        children: Any = value.values()
    elif isinstance(value, (list, tuple)):
        children = value
    else:
        return 0
    deepest = 0
    for item in children:
        if deepest >= limit - 1:
            break
        deepest = max(deepest, _depth(item, limit - 1))
    return deepest + 1


def _check_depth(jobs: Sequence[Mapping[str, Any]]) -> None:
    for i, kwargs in enumerate(jobs):
        if _depth(kwargs, ARGS_MAX_DEPTH + 1) > ARGS_MAX_DEPTH:
            raise InvalidArguments(
                f"arguments{_job(jobs, i)}: nested more than {ARGS_MAX_DEPTH} levels deep"
            )


def _check_sizes(
    jobs: Sequence[Mapping[str, Any]], max_bytes: int, dumps: Callable[[Any], str]
) -> None:
    for i, kwargs in enumerate(jobs):
        size = len(dumps(kwargs))
        if size > max_bytes:
            raise InvalidArguments(
                f"arguments{_job(jobs, i)}: {size:,} bytes as JSON, more than the app's "
                f"max_args_bytes ({max_bytes:,}): pass a reference (a key, a URL) instead"
            )
