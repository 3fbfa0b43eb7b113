"""Turns without a database: whose turn an announcement is."""

from __future__ import annotations

from collections import Counter

import pytest

from pgtq.turns import MIN_FLEET, Answer, whose_turn

pytestmark = pytest.mark.unit

ROSTER = [
    ("w3", None),
    ("w1", ["emails"]),
    ("w2", ["emails", "other"]),
    ("w5", ["emails"]),
    ("w4", ["other"]),
]
EMAILS = ["w1", "w2", "w3", "w5"]  # w4 serves only "other"


def test_each_announcement_is_one_workers_turn_and_successive_ones_rotate() -> None:
    turns = [whose_turn(ROSTER, "w1", "emails", first) for first in range(8)]
    assert Counter(turns) == {name: 2 for name in EMAILS}
    for first in range(8):  # every worker of the queue agrees on whose turn it is
        assert len({whose_turn(ROSTER, me, "emails", first) for me in EMAILS}) == 1


def test_a_small_fleet_answers_all_at_once() -> None:
    small = ROSTER[: MIN_FLEET - 2]
    assert whose_turn(small, "w9", "emails", 7) is None
    assert whose_turn([], "alone", "emails", 7) is None


def test_a_worker_the_others_do_not_know_yet_may_share_a_turn_never_leave_one() -> None:
    """Its own roster has it, the others' not yet: the turn they agree on is always one of
    theirs, so a turn never falls to nobody."""
    for first in range(12):
        theirs = {whose_turn(ROSTER, me, "emails", first) for me in EMAILS}
        assert len(theirs) == 1 and theirs <= set(EMAILS)


def test_answers_add_up() -> None:
    assert Answer(2, "q").merge(Answer(3, "q")) == Answer(5, "q")
