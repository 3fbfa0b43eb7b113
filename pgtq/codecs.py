"""Argument and result types beyond JSON: how they are written, and read back by annotation.

A job's arguments are stored as plain JSON, readable and writable by the SQL API
(``pgtq.defer_job``) and other languages, with no type tags: a ``datetime`` is its ISO 8601
text, a UUID and a Decimal their text, an Enum its value, a dataclass or a pydantic model
its JSON object. Encoding is a ``default=`` hook of the one C ``json`` encoder call, so
plain JSON values never reach Python code; decoding is driven by the task's annotations,
resolved once per task (a task whose parameters are all plain JSON gets no decoder at all,
and pays nothing per job).

Pure functions: no I/O, and no pgtq import but :mod:`pgtq.errors`. pydantic is optional:
never imported here, only looked up in ``sys.modules`` (a pydantic model exists only if
pydantic was imported).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import logging
import sys
import types
import typing
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, TypeVar, overload

from pgtq.errors import InvalidArguments

__all__ = [
    "ArgumentDecodeError",
    "ArgumentsDecoder",
    "Codec",
    "Decoder",
    "Encoder",
    "arguments_decoder",
    "decode",
    "decoder_for",
    "encode_default",
    "result_decoder",
]

logger = logging.getLogger("pgtq.codecs")

T = TypeVar("T")

#: ``App(encoder=...)``: a ``json`` ``default=`` hook, called with a value neither JSON nor
#: a type pgtq encodes itself; returns something JSON-encodable, or raises ``TypeError``.
Encoder = Callable[[Any], Any]
#: A decoder: the JSON form of a value (``str``, ``int``, ``dict``, ...) to the value.
Decoder = Callable[[Any], Any]


class ArgumentDecodeError(InvalidArguments):
    """Stored as the error of a job whose stored argument cannot be read as its parameter's
    annotated type (``"when": "tomorrow"`` for ``when: datetime``). The job fails at once,
    whatever its retry policy: its arguments never change, so no retry would read them."""


# -- encoding ---------------------------------------------------------------------------------


def _iso(value: date | time) -> str:
    return value.isoformat()


#: The wire form of the built-in types, by exact type (subclasses: see :func:`_builtin`).
#: datetime before date: a datetime is a date.
_ENCODERS: dict[type, Callable[[Any], Any]] = {
    datetime: _iso,
    date: _iso,
    time: _iso,
    uuid.UUID: str,
    Decimal: str,
}

_UNKNOWN: Any = object()


def _builtin(value: Any) -> Any:
    """The JSON form of a value of a type pgtq encodes itself, else :data:`_UNKNOWN`. The
    form may hold further non-JSON values (a dataclass's fields): the encoder calls the hook
    again for each."""
    encode = _ENCODERS.get(type(value))
    if encode is not None:
        return encode(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    pydantic = sys.modules.get("pydantic")
    # pydantic 2 (``model_dump``); a 1.x model is refused as unknown.
    if (
        pydantic is not None
        and isinstance(value, pydantic.BaseModel)
        and hasattr(value, "model_dump")
    ):
        return value.model_dump(mode="json")
    for base, encode in _ENCODERS.items():  # subclasses (pendulum's DateTime, ...)
        if isinstance(value, base):
            return encode(value)
    return _UNKNOWN


def _not_encodable(value: Any) -> TypeError:
    return TypeError(
        f"Object of type {type(value).__name__} is not JSON serializable (pgtq encodes "
        "datetime, date, time, UUID, Decimal, Enum, dataclasses and pydantic models; "
        "App(encoder=...) for other types)"
    )


def encode_default(value: Any) -> Any:
    """The ``default=`` hook of pgtq's JSON encoder: the built-in types' wire form."""
    encoded = _builtin(value)
    if encoded is _UNKNOWN:
        raise _not_encodable(value)
    return encoded


def _chain(encoder: Encoder) -> Encoder:
    """The built-in types first (their wire form is fixed: SQL and other languages read
    it), then the app's own hook."""

    def default(value: Any) -> Any:
        encoded = _builtin(value)
        return encoder(value) if encoded is _UNKNOWN else encoded

    return default


class Codec:
    """An app's JSON: its encoder (``dumps``, the built-in types, then ``App(encoder=)``)
    and its decoders by type (``App(decoders=)``, laid over the built-in ones)."""

    def __init__(
        self,
        dumps: Callable[[Any], str],
        encoder: Encoder | None = None,
        decoders: Mapping[Any, Decoder] | None = None,
    ) -> None:
        if encoder is not None and not callable(encoder):
            raise TypeError(f"encoder must be a callable (a json default= hook), got {encoder!r}")
        for key, fn in (decoders or {}).items():
            if not callable(fn):
                raise TypeError(f"decoders[{key!r}] must be a callable, got {fn!r}")
        self.encoder = encoder
        self.decoders: Mapping[Any, Decoder] = dict(decoders or {})
        if encoder is None:
            #: JSON the way pgtq stores it (:func:`pgtq.model.dumps` without a hook of yours).
            self.dumps = dumps
        else:
            own = json.JSONEncoder(separators=(",", ":"), allow_nan=False, default=_chain(encoder))
            self.dumps = own.encode

    def plain(self, value: Any) -> Any:
        """``value`` as the JSON it is stored as, read back (only with an encoder of yours:
        pgtq's own statements encode the built-in types themselves)."""
        return value if self.encoder is None else json.loads(self.dumps(value))


# -- decoding ---------------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if type(value) is not str:
        raise TypeError(f"expected {what}, got {type(value).__name__}")
    return value


def _datetime(value: Any) -> datetime:
    """ISO 8601 text (as pgtq writes it), or a JSON number of epoch seconds, read as an
    aware UTC datetime (a periodic task's ``timestamp``, SQL's ``extract(epoch ...)``)."""
    if isinstance(value, datetime):
        return value
    if type(value) is int or type(value) is float:
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(_text(value, "an ISO 8601 date and time (text)"))


def _date(value: Any) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    return date.fromisoformat(_text(value, "an ISO 8601 date (text)"))


def _time(value: Any) -> time:
    if isinstance(value, time):
        return value
    return time.fromisoformat(_text(value, "an ISO 8601 time (text)"))


def _uuid(value: Any) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    return uuid.UUID(_text(value, "a UUID (text)"))


def _decimal(value: Any) -> Decimal:
    """Text (exact, as pgtq writes it), or a JSON number (from SQL or another language): an
    int exactly, a float by its shortest text (``0.1`` is ``Decimal("0.1")``)."""
    if isinstance(value, Decimal):
        return value
    if type(value) is str:
        return Decimal(value)
    if type(value) is int:
        return Decimal(value)
    if type(value) is float:
        return Decimal(repr(value))
    raise TypeError(f"expected a decimal number (text or number), got {type(value).__name__}")


_DECODERS: dict[Any, Decoder] = {
    datetime: _datetime,
    date: _date,
    time: _time,
    uuid.UUID: _uuid,
    Decimal: _decimal,
}

#: Annotations whose JSON is the value: no decoder.
_PLAIN: frozenset[Any] = frozenset(
    {Any, object, str, int, float, bool, list, dict, type(None), None, inspect.Parameter.empty}
)


def _enum(cls: type[enum.Enum]) -> Decoder:
    def read(value: Any) -> Any:
        return value if isinstance(value, cls) else cls(value)

    return read


def _pydantic_model(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")
    return (
        pydantic is not None
        and isinstance(tp, type)
        and issubclass(tp, pydantic.BaseModel)
        and hasattr(tp, "model_validate")  # pydantic 2: a 1.x model is left as JSON
    )


def _optional(inner: Decoder) -> Decoder:
    def read(value: Any) -> Any:
        return None if value is None else inner(value)

    return read


def _list(inner: Decoder, make: Callable[[Any], Any] = list) -> Decoder:
    def read(value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a JSON array, got {type(value).__name__}")
        return make([inner(item) for item in value])

    return read


def _dict(inner: Decoder) -> Decoder:
    def read(value: Any) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected a JSON object, got {type(value).__name__}")
        return {key: inner(item) for key, item in value.items()}

    return read


def _dataclass(cls: type, custom: Mapping[Any, Decoder], seen: dict[Any, Decoder]) -> Decoder:
    """A dataclass from its JSON object, each field read by its own annotation (the same
    rules as a task's parameters, pydantic or not: one behaviour wherever it runs)."""
    fields: dict[str, Decoder | None] = {}
    settable = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
    skipped = frozenset(f.name for f in dataclasses.fields(cls) if not f.init)

    def read(value: Any) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(
                f"expected a JSON object for {cls.__name__}, got {type(value).__name__}"
            )
        kwargs = {}
        for key, item in value.items():
            if key in skipped:
                continue  # written by pgtq (every field is), not taken by __init__
            decode = fields.get(key) if key in settable else None
            kwargs[key] = item if decode is None else decode(item)
        return cls(**kwargs)

    seen[cls] = read  # a field of its own type reads through this same decoder
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in hints:
            fields[f.name] = decoder_for(hints[f.name], custom, seen)
    return read


def _hints(obj: Any) -> dict[str, Any]:
    """``obj``'s annotations resolved; those that cannot be (a name defined later, or only
    under ``TYPE_CHECKING``) left out, each alone."""
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:
        pass
    raw = inspect.get_annotations(obj)
    nsobj = inspect.unwrap(obj) if callable(obj) and not isinstance(obj, type) else obj
    globalns = getattr(nsobj, "__globals__", None)
    if globalns is None:
        globalns = vars(sys.modules.get(getattr(obj, "__module__", ""), types.ModuleType("_")))
    resolved: dict[str, Any] = {}
    for name, annotation in raw.items():
        shim = types.SimpleNamespace(__annotations__={name: annotation})
        try:
            resolved.update(typing.get_type_hints(shim, globalns, None, include_extras=True))
        except Exception:
            continue
    return resolved


def decoder_for(
    annotation: Any,
    custom: Mapping[Any, Decoder] | None = None,
    _seen: dict[Any, Decoder] | None = None,
) -> Decoder | None:
    """How to read a JSON value as ``annotation``, or None when the JSON is the value
    (plain JSON types, ``Any``, and annotations pgtq does not know: left as JSON).

    Known: ``custom`` (``App(decoders=)``, by the annotation itself), datetime, date, time,
    UUID, Decimal, Enum, dataclasses, pydantic models, ``X | None``, ``list[X]``,
    ``tuple[X, ...]``, ``dict[str, X]``, ``Annotated[X, ...]`` and ``NewType``s. A union of
    several types but None is left as JSON (which to try first would be a guess).
    """
    custom = custom or {}
    seen = {} if _seen is None else _seen
    try:
        mine = custom.get(annotation)
    except TypeError:  # an unhashable annotation
        mine = None
    if mine is not None:
        return mine
    try:
        if annotation in _PLAIN:
            return None
        known = _DECODERS.get(annotation)
    except TypeError:
        known = None
    if known is not None:
        return known
    if annotation in seen:
        return seen[annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return decoder_for(args[0], custom, seen)
    if origin is typing.Union or origin is types.UnionType:
        others = [a for a in args if a is not type(None)]
        if len(others) != 1:
            return None
        inner = decoder_for(others[0], custom, seen)
        return None if inner is None else _optional(inner)
    if origin in (list, Sequence) and len(args) == 1:
        inner = decoder_for(args[0], custom, seen)
        return None if inner is None else _list(inner)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        inner = decoder_for(args[0], custom, seen)
        return None if inner is None else _list(inner, tuple)
    if origin in (dict, Mapping) and len(args) == 2:
        inner = decoder_for(args[1], custom, seen)
        return None if inner is None else _dict(inner)
    supertype = getattr(annotation, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return decoder_for(supertype, custom, seen)
    if not isinstance(annotation, type):
        return None
    if issubclass(annotation, enum.Enum):
        return _enum(annotation)
    if _pydantic_model(annotation):
        validate: Decoder = annotation.model_validate  # type: ignore[attr-defined]
        return validate
    if dataclasses.is_dataclass(annotation):
        return _dataclass(annotation, custom, seen)
    for base, decode in _DECODERS.items():  # a subclass of a known type: read as the type
        if issubclass(annotation, base):
            return decode
    return None


@overload
def decode(annotation: type[T], value: Any, decoders: Mapping[Any, Decoder] | None = ...) -> T: ...
@overload
def decode(annotation: Any, value: Any, decoders: Mapping[Any, Decoder] | None = ...) -> Any: ...
def decode(annotation: Any, value: Any, decoders: Mapping[Any, Decoder] | None = None) -> Any:
    """A JSON value read as ``annotation``, as the worker reads a task's arguments: e.g. a
    job's result, ``decode(datetime, app.jobs.wait(job_id))`` (``wait`` and ``get`` give
    the JSON form)."""
    decoder = decoder_for(annotation, decoders)
    return value if decoder is None else decoder(value)


def _name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else repr(annotation)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


class ArgumentsDecoder:
    """A task's keyword arguments from their JSON, parameter by parameter; made once per
    task (:func:`arguments_decoder`) for the parameters that need it."""

    def __init__(
        self,
        func: Callable[..., Any],
        params: Sequence[str],
        custom: Mapping[Any, Decoder],
        decoders: dict[str, tuple[Any, Decoder]],
        unresolved: bool,
    ) -> None:
        self._func = func
        self._params = params
        self._custom = custom
        self._decoders = tuple((name, a, d) for name, (a, d) in decoders.items())
        # Some annotation could not be resolved at registration (a class defined after the
        # task): tried once more at the first job, when the module has been run to its end.
        self._unresolved = unresolved

    def __call__(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments decoded (a new dict); :class:`ArgumentDecodeError` naming the
        parameter when one cannot be read."""
        if self._unresolved:
            self._unresolved = False
            again, unresolved = _decoders(self._func, self._params, self._custom)
            if len(again) > len(self._decoders):
                self._decoders = tuple((name, a, d) for name, (a, d) in again.items())
            if unresolved:
                logger.warning(
                    "%s: the annotations of %s cannot be resolved (a name imported only under "
                    "TYPE_CHECKING, or a class local to a function?): their JSON is passed as is",
                    getattr(self._func, "__qualname__", self._func),
                    ", ".join(repr(name) for name in unresolved),
                )
        decoded = dict(args)
        for name, annotation, decoder in self._decoders:
            if name in decoded:
                try:
                    decoded[name] = decoder(decoded[name])
                except Exception as exc:
                    raise ArgumentDecodeError(
                        f"argument {name!r}: cannot be read as {_name(annotation)} from "
                        f"{_shown(decoded[name])}: {type(exc).__name__}: {exc}"
                    ) from exc
        return decoded


def _decoders(
    func: Callable[..., Any], params: Sequence[str], custom: Mapping[Any, Decoder]
) -> tuple[dict[str, tuple[Any, Decoder]], list[str]]:
    """Per parameter that needs one, its annotation and decoder; and the parameters whose
    annotation could not be resolved."""
    hints = _hints(func)
    annotated = inspect.get_annotations(func)
    found: dict[str, tuple[Any, Decoder]] = {}
    for name in params:
        if name not in hints:
            continue
        decoder = decoder_for(hints[name], custom)
        if decoder is not None:
            found[name] = (hints[name], decoder)
    return found, [name for name in params if name in annotated and name not in hints]


def arguments_decoder(
    func: Callable[..., Any], *, skip_first: bool, decoders: Mapping[Any, Decoder] | None = None
) -> ArgumentsDecoder | None:
    """The decoder of a task's keyword arguments, or None when every parameter takes its
    JSON as is (str, int, float, bool, list, dict, Any, unannotated...): then a job pays
    nothing. ``skip_first``: the task takes a ``JobContext`` first."""
    P = inspect.Parameter
    params = [
        p.name
        for p in list(inspect.signature(func).parameters.values())[1 if skip_first else 0 :]
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
    ]
    custom = dict(decoders or {})
    try:
        found, unresolved = _decoders(func, params, custom)
    except Exception:  # an exotic callable: its arguments stay JSON, as before
        logger.debug("%r: no argument decoders", func, exc_info=True)
        return None
    if not found and not unresolved:
        return None
    if unresolved:
        logger.debug("%r: some annotations are resolved at its first job", func)
    return ArgumentsDecoder(func, params, custom, found, bool(unresolved))


def result_decoder(
    func: Callable[..., Any], decoders: Mapping[Any, Decoder] | None = None
) -> Decoder | None:
    """How ``app.jobs.wait`` reads a task's stored result back as its return annotation
    (an async task's: what it returns, awaited), or None when the JSON is the value (plain
    JSON, ``Any``, unannotated, or an annotation that cannot be resolved)."""
    try:
        annotation = _hints(func).get("return", Any)
        return decoder_for(annotation, decoders)
    except Exception:  # an exotic callable: its result stays JSON, as before
        return None
