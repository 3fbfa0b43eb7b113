"""Argument and result types beyond JSON (``pgtq.codecs``), without a database: the wire
form each type is written as, how a task's annotations read it back, and what fails how."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, NewType

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgtq
from pgtq import codecs, validation
from pgtq.model import ClaimedJob, Status, dumps
from pgtq.outcomes import decide

pytestmark = pytest.mark.unit

try:
    import pydantic
except ImportError:  # pragma: no cover - pydantic is optional
    pydantic = None  # type: ignore[assignment]


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Point:
    x: int
    y: int


@dataclasses.dataclass
class Event:
    when: datetime
    where: Point
    ids: list[uuid.UUID]
    color: Color | None = None
    computed: int = dataclasses.field(default=0, init=False)
    parent: Event | None = None


UserId = NewType("UserId", uuid.UUID)


class Money:
    """A type pgtq does not know: the app's ``encoder`` and ``decoders`` handle it."""

    def __init__(self, cents: int) -> None:
        self.cents = cents

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and other.cents == self.cents

    def __hash__(self) -> int:
        return self.cents


def money_encoder(value: Any) -> Any:
    if isinstance(value, Money):
        return f"{value.cents / 100:.2f} EUR"
    raise TypeError(f"no JSON for {type(value).__name__}")


def money_decoder(value: Any) -> Money:
    return Money(round(float(value.removesuffix(" EUR")) * 100))


AWARE = datetime(2026, 12, 3, 10, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
NAIVE = datetime(2026, 12, 3, 10, 0)
U = uuid.UUID("12345678-1234-5678-1234-567812345678")


# -- the wire form --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (AWARE, "2026-12-03T10:00:00.123456+02:00"),  # aware: its offset kept
        (datetime(2026, 12, 3, tzinfo=UTC), "2026-12-03T00:00:00+00:00"),
        (NAIVE, "2026-12-03T10:00:00"),  # naive: no offset, read back naive
        (date(2026, 12, 3), "2026-12-03"),
        (time(10, 30, 5), "10:30:05"),
        (U, "12345678-1234-5678-1234-567812345678"),
        (Decimal("1.10"), "1.10"),  # exact, its trailing zero kept
        (Decimal("1E+3"), "1E+3"),
        (Decimal("0.1000000000000000000000000001"), "0.1000000000000000000000000001"),
        (Color.RED, "red"),
        (Level.HIGH, 2),  # an IntEnum is an int to the encoder
        (Point(1, 2), {"x": 1, "y": 2}),
    ],
)
def test_the_wire_form_is_plain_json(value: Any, wire: Any) -> None:
    assert json.loads(dumps({"v": value})) == {"v": wire}


def test_a_dataclass_holds_encoded_values() -> None:
    event = Event(AWARE, Point(1, 2), [U], Color.BLUE)
    assert json.loads(dumps(event)) == {
        "when": "2026-12-03T10:00:00.123456+02:00",
        "where": {"x": 1, "y": 2},
        "ids": [str(U)],
        "color": "blue",
        "computed": 0,
        "parent": None,
    }


@pytest.mark.skipif(pydantic is None, reason="pydantic is not installed")
def test_a_pydantic_model_is_its_json_mode_dump() -> None:
    class Order(pydantic.BaseModel):
        id: uuid.UUID
        at: datetime
        total: Decimal

    order = Order(id=U, at=AWARE, total=Decimal("9.90"))
    assert json.loads(dumps({"o": order})) == {"o": order.model_dump(mode="json")}


def test_plain_json_never_reaches_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[Any] = []
    real = codecs._builtin
    monkeypatch.setattr(codecs, "_builtin", lambda v: called.append(v) or real(v))
    plain = {"s": "x", "i": 1, "f": 1.5, "b": True, "n": None, "l": [1, {"a": [2]}], "t": (1,)}
    assert validation.encode_arguments([plain], None) == dumps([plain])
    assert called == []


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([{"fine": 1, "bad": {1, 2}}], r"^arguments: must be JSON-serializable \(argument 'bad'\)"),
        ([{"x": 1}, {"x": object()}], r"^arguments \(job 1 of 2\): .*\(argument 'x'\)"),
        ([{"t": timedelta(1)}], r"argument 't'.*timedelta.*App\(encoder=\.\.\.\)"),
        ([{"d": Decimal("NaN"), "m": Money(1)}], r"argument 'm'"),
    ],
)
def test_what_cannot_be_encoded_is_named(jobs: Any, message: str) -> None:
    with pytest.raises(pgtq.InvalidArguments, match=message):
        validation.encode_arguments(jobs, None)


def test_the_checks_hold_for_encoded_values() -> None:
    """Sizes, depth and what jsonb refuses are checked on the encoded text, so on what a
    hook returns too."""
    with pytest.raises(pgtq.InvalidArguments, match="more than the app's max_args_bytes"):
        validation.encode_arguments([{"when": [AWARE] * 10}], 100)
    codec = codecs.Codec(dumps, lambda v: "a\x00b")
    with pytest.raises(pgtq.InvalidArguments, match="NUL"):
        validation.encode_arguments([{"m": Money(1)}], None, codec.dumps)


def test_an_app_encoder_comes_after_the_built_in_types() -> None:
    codec = codecs.Codec(dumps, money_encoder)
    assert json.loads(codec.dumps({"m": Money(150), "d": date(2026, 1, 2)})) == {
        "m": "1.50 EUR",
        "d": "2026-01-02",
    }
    assert codec.plain({"m": Money(1)}) == {"m": "0.01 EUR"}
    with pytest.raises(pgtq.InvalidArguments, match=r"argument 'x'.*no JSON for object"):
        validation.encode_arguments([{"x": object()}], None, codec.dumps)
    with pytest.raises(pgtq.InvalidArguments, match="meta: must be JSON-serializable: 'boom'"):
        validation.check_meta({"m": Money(1)}, None, codecs.Codec(dumps, _boom).dumps)


def _boom(value: Any) -> Any:
    raise KeyError("boom")


def test_bad_hooks_are_refused_by_the_app() -> None:
    with pytest.raises(pgtq.ConfigurationError, match="encoder must be a callable"):
        pgtq.App("postgresql://nowhere/db", encoder=42)  # type: ignore[arg-type]
    with pytest.raises(pgtq.ConfigurationError, match=r"decoders\[<class 'int'>\]"):
        pgtq.App("postgresql://nowhere/db", decoders={int: "int"})  # type: ignore[dict-item]


# -- decoding by annotation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "wire", "value"),
    [
        (datetime, "2026-12-03T10:00:00Z", datetime(2026, 12, 3, 10, tzinfo=UTC)),
        (datetime, "2026-12-03T10:00:00", NAIVE),
        (datetime, "2026-12-03", datetime(2026, 12, 3)),
        (datetime, 1_796_292_000, datetime(2026, 12, 3, 10, tzinfo=UTC)),  # epoch seconds
        (datetime, 0.5, datetime(1970, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        (date, "2026-12-03", date(2026, 12, 3)),
        (time, "10:30:05+01:00", time(10, 30, 5, tzinfo=timezone(timedelta(hours=1)))),
        (uuid.UUID, str(U), U),
        (Decimal, "1.10", Decimal("1.10")),
        (Decimal, 3, Decimal(3)),
        (Decimal, 0.1, Decimal("0.1")),  # a JSON number from SQL: its shortest text
        (Color, "red", Color.RED),
        (Level, 2, Level.HIGH),
        (UserId, str(U), U),
        (Annotated[date, "doc"], "2026-12-03", date(2026, 12, 3)),
        (datetime | None, None, None),
        (datetime | None, "2026-12-03T10:00", NAIVE),
        (list[date], ["2026-12-03"], [date(2026, 12, 3)]),
        (tuple[date, ...], ["2026-12-03"], (date(2026, 12, 3),)),
        (dict[str, Color], {"a": "blue"}, {"a": Color.BLUE}),
        (list[list[uuid.UUID]] | None, [[str(U)]], [[U]]),
        (Point, {"x": 1, "y": 2}, Point(1, 2)),
    ],
)
def test_annotations_read_the_wire_form(annotation: Any, wire: Any, value: Any) -> None:
    decoded = codecs.decode(annotation, wire)
    assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize(
    "annotation",
    [
        str,
        int,
        float,
        bool,
        list,
        dict,
        Any,
        object,
        list[int],
        dict[str, Any],
        int | None,
        int | datetime,
        datetime | date | None,
        Money,
        "NotAType",
    ],
)
def test_plain_and_unknown_annotations_have_no_decoder(annotation: Any) -> None:
    """JSON types need none; a union of several types is not guessed; an unknown class is
    left as JSON (App(decoders=) for it)."""
    assert codecs.decoder_for(annotation) is None


def test_a_dataclass_reads_back_nested() -> None:
    event = Event(AWARE, Point(1, 2), [U], Color.BLUE, parent=Event(NAIVE, Point(0, 0), []))
    wire = json.loads(dumps(event))
    assert codecs.decode(Event, wire) == event


@pytest.mark.skipif(pydantic is None, reason="pydantic is not installed")
def test_a_pydantic_model_reads_back() -> None:
    class Order(pydantic.BaseModel):
        id: uuid.UUID
        at: datetime
        total: Decimal

    order = Order(id=U, at=AWARE, total=Decimal("9.90"))
    assert codecs.decode(Order, json.loads(dumps(order))) == order
    with pytest.raises(pydantic.ValidationError):
        codecs.decode(Order, {"id": "nope"})


def test_app_decoders_add_types_and_override_built_in_ones() -> None:
    custom: dict[Any, codecs.Decoder] = {Money: money_decoder, datetime: lambda v: "mine"}
    assert codecs.decode(Money, "1.50 EUR", custom) == Money(150)
    assert codecs.decode(list[Money] | None, ["0.01 EUR"], custom) == [Money(1)]
    assert codecs.decode(datetime, "2026-01-01", custom) == "mine"


@given(st.datetimes(timezones=st.none() | st.timezones()))
def test_datetimes_round_trip(value: datetime) -> None:
    decoded = codecs.decode(datetime, json.loads(dumps(value)))
    # The wall time and the offset (an aware datetime in a fold never compares equal
    # across time zones, PEP 495).
    assert decoded.isoformat() == value.isoformat()
    assert (decoded.tzinfo is None) == (value.tzinfo is None)


@given(st.decimals(allow_nan=False) | st.uuids() | st.dates() | st.times())
def test_values_round_trip(value: Any) -> None:
    assert codecs.decode(type(value), json.loads(dumps(value))) == value


# -- a task's arguments -------------------------------------------------------------------------


def plain_task(ctx: Any, a: int, b: str, c: list[int], d: dict[str, Any], e: Any, f=1) -> None:
    """Every parameter takes its JSON as is."""


def typed_task(ctx: pgtq.JobContext, when: datetime, n: int, on: list[date] | None = None) -> None:
    """Two parameters need a decoder."""


def test_a_task_of_plain_parameters_has_no_decoder() -> None:
    assert codecs.arguments_decoder(plain_task, skip_first=True) is None


def test_a_task_decodes_only_what_needs_it() -> None:
    decode = codecs.arguments_decoder(typed_task, skip_first=True)
    assert decode is not None
    args = {"when": "2026-12-03T10:00:00Z", "n": 1, "on": ["2026-12-03"]}
    assert decode(args) == {
        "when": datetime(2026, 12, 3, 10, tzinfo=UTC),
        "n": 1,
        "on": [date(2026, 12, 3)],
    }
    assert args["when"] == "2026-12-03T10:00:00Z"  # the job's own args are left alone
    assert decode({"when": "2026-12-03T10:00:00Z", "n": 1}) == {  # a default is not decoded
        "when": datetime(2026, 12, 3, 10, tzinfo=UTC),
        "n": 1,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"when": "tomorrow", "n": 1}, r"'when': cannot be read as datetime from 'tomorrow'"),
        ({"when": ["x"], "n": 1}, r"'when': .*expected an ISO 8601 date and time \(text\)"),
        ({"when": "2026-12-03", "n": 1, "on": "2026-12-03"}, r"'on'.*expected a JSON array"),
    ],
)
def test_an_argument_that_cannot_be_read_names_its_parameter(
    args: dict[str, Any], message: str
) -> None:
    decode = codecs.arguments_decoder(typed_task, skip_first=True)
    assert decode is not None
    with pytest.raises(codecs.ArgumentDecodeError, match=message):
        decode(args)


def test_an_annotation_defined_later_is_resolved_at_the_first_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def later(when: Later, other: Nowhere) -> None:  # type: ignore[name-defined]  # noqa: F821
        """``Later`` is defined after registration; ``Nowhere`` never is."""

    decode = codecs.arguments_decoder(later, skip_first=False)
    assert decode is not None  # pending: tried again at the first job
    globals()["Later"] = Point
    try:
        with caplog.at_level(logging.WARNING, logger="pgtq.codecs"):
            assert decode({"when": {"x": 1, "y": 2}, "other": 3}) == {
                "when": Point(1, 2),
                "other": 3,
            }
    finally:
        del globals()["Later"]
    assert "'other'" in caplog.text and "passed as is" in caplog.text


# -- results and the outcome of a decode failure ------------------------------------------------


def test_a_result_decoder_follows_the_return_annotation() -> None:
    async def coro() -> datetime: ...

    def plain() -> dict[str, int]: ...

    def bare():  # type: ignore[no-untyped-def]
        ...

    decode = codecs.result_decoder(coro)
    assert decode is not None and decode("2026-12-03T10:00:00Z") == datetime(
        2026, 12, 3, 10, tzinfo=UTC
    )
    assert codecs.result_decoder(plain) is None and codecs.result_decoder(bare) is None


JOB = ClaimedJob(1, "default", "t", {}, 1, 0, None)


def test_a_result_is_written_by_the_apps_encoder() -> None:
    app = pgtq.App("postgresql://nowhere/db", encoder=money_encoder)

    @app.task
    def t() -> None: ...

    outcome = decide(t, JOB, result={"at": AWARE, "paid": Money(250)})
    assert outcome.status is Status.SUCCEEDED
    assert json.loads(outcome.result or "") == {
        "at": "2026-12-03T10:00:00.123456+02:00",
        "paid": "2.50 EUR",
    }
    assert codecs.decode(datetime, json.loads(outcome.result or "")["at"]) == AWARE
    failed = decide(t, JOB, result={1, 2})
    assert failed.status is Status.FAILED and "not JSON-serializable" in (failed.error or "")


def test_a_decode_failure_fails_at_once_whatever_the_retry_policy() -> None:
    app = pgtq.App("postgresql://nowhere/db")

    @app.task(retry=5)
    def t(when: datetime) -> None: ...

    assert t.decode_arguments is not None
    with pytest.raises(codecs.ArgumentDecodeError) as raised:
        t.decode_arguments({"when": "soon"})
    outcome = decide(t, JOB, exc=raised.value)
    assert outcome.status is Status.FAILED and outcome.retry_in is None
    error = json.loads(outcome.error or "")
    assert error["type"] == "ArgumentDecodeError" and "argument 'when'" in error["message"]
    assert decide(t, JOB, exc=ValueError()).status is Status.TODO  # others follow the policy


def test_defer_encodes_without_a_database() -> None:
    app = pgtq.App(
        "postgresql://nowhere/db", encoder=money_encoder, decoders={Money: money_decoder}
    )

    @app.task
    def pay(amount: Money, at: datetime, color: Color) -> None: ...

    new = pay.configure().encode([{"amount": Money(5), "at": AWARE, "color": Color.RED}])
    stored = json.loads(new.args)
    assert stored == [{"amount": "0.05 EUR", "at": AWARE.isoformat(), "color": "red"}]
    assert pay.decode_arguments is not None
    assert pay.decode_arguments(stored[0]) == {"amount": Money(5), "at": AWARE, "color": Color.RED}
    one = {"amount": Money(5), "at": AWARE, "color": Color.RED}
    each = pay.configure(tags=["x"]).encode_each([one], batch=False)
    assert '"0.05 EUR"' in each.rows
    deferrer = pay.configure(meta={"at": AWARE, "amount": Money(1)})
    assert deferrer.options.meta == {"at": AWARE.isoformat(), "amount": "0.01 EUR"}


def test_helpers_are_callables() -> None:
    fn: Callable[[Any], Any] = codecs.encode_default
    with pytest.raises(TypeError, match="not JSON serializable"):
        fn(object())
