"""Turns without a database: whose turn an announcement is, and what a taken notice drops."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from pgtq.turns import Answer, Turns, parse_taken, turn

pytestmark = pytest.mark.unit

ROSTER = [("w3", None), ("w1", ["emails"]), ("w2", ["emails", "other"]), ("w4", ["other"])]


def test_each_announcement_has_one_worker_at_turn_zero_and_successive_ones_rotate() -> None:
    members = ["w1", "w2", "w3"]  # the workers of "emails": w4 serves only "other"
    for token in range(12):
        turns = [turn(ROSTER, me, "emails", token) for me in members]
        assert sorted(turns) == [0, 1, 2]
    firsts = [next(m for m in members if turn(ROSTER, m, "emails", t) == 0) for t in range(6)]
    assert Counter(firsts) == {"w1": 2, "w2": 2, "w3": 2}


def test_a_worker_missing_from_the_others_roster_shares_a_turn_at_worst() -> None:
    """A new worker the others do not know yet: one or two workers at turn 0, never none."""
    assert turn([], "new", "emails", 7) == 0  # alone
    for token in range(12):
        turns = [turn(ROSTER, me, "emails", token) for me in ("w1", "w2", "w3", "new")]
        assert 1 <= turns.count(0) <= 2


def test_taken_notices_parse() -> None:
    assert parse_taken("12 15") == [12, 15]
    assert parse_taken("12 x -3") == [12]  # never raises on a foreign payload
    assert Answer((1,), 2, "q").merge(Answer((5,), 3, "q")).payload == "1 5"


class Fleet:
    """Workers' turns side by side, recording who answered what."""

    def __init__(self, names: list[str], **settings: float) -> None:
        self.roster = [(name, None) for name in names]
        self.answered: list[tuple[str, Answer]] = []
        self._expected, self._all_in = 0, asyncio.Event()
        self.turns = {name: self._turns(name, settings) for name in names}

    def _turns(self, name: str, settings: dict[str, float]) -> Turns:
        turns = Turns(lambda: name, lambda answer: self._answer(name, answer), **settings)  # type: ignore[arg-type]
        turns.roster = self.roster
        return turns

    def _answer(self, name: str, answer: Answer) -> None:
        self.answered.append((name, answer))
        if len(self.answered) >= self._expected:
            self._all_in.set()

    def heard(self, token: int) -> None:
        for turns in self.turns.values():
            turns.heard("q", token, 1)

    async def until_answered(self, count: int) -> list[str]:
        self._expected = count
        if len(self.answered) < count:
            self._all_in.clear()
            await asyncio.wait_for(self._all_in.wait(), 5)
        return [name for name, _ in self.answered]


async def test_turn_zero_answers_at_once_and_later_turns_wait_unless_taken() -> None:
    fleet = Fleet(["a", "b", "c"], turn_seconds=0.02)
    first = next(me for me in "abc" if turn(fleet.roster, me, "q", 10) == 0)
    fleet.heard(10)
    assert fleet.answered == [(first, Answer((10,), 1, "q"))]  # at once, and only turn 0
    for turns in fleet.turns.values():
        turns.taken([10])  # the answering claim's notice
    await asyncio.sleep(0.1)  # past every turn: a wrong answer would have come
    assert len(fleet.answered) == 1
    fleet.heard(11)  # nobody takes it: every turn comes, one after the other
    assert sorted((await fleet.until_answered(4))[1:]) == ["a", "b", "c"]


async def test_after_the_last_turn_every_worker_left_answers() -> None:
    names = [f"w{n:02}" for n in range(10)]
    fleet = Fleet(names, turn_seconds=0.01, turns=2)
    fleet.heard(0)
    answered = await fleet.until_answered(10)
    assert answered[0] == "w00" and sorted(answered) == names
