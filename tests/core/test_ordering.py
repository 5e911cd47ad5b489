"""Queue order (SPEC §3): priority, then enqueue time, with aging; priority changes; move to top."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dispatcher.core.ordering import order_score, rescore, top_score
from dispatcher.models import Priority
from tests.support.builders import sort_key

pytestmark = pytest.mark.unit

HIGH = Priority.high
NORMAL = Priority.normal
BOOST = 3600.0


@pytest.mark.parametrize(
    ("priority", "enqueued_at", "boost", "score"),
    [
        (NORMAL, 1_000.0, BOOST, 1_000.0),
        (HIGH, 1_000.0, BOOST, 1_000.0 - BOOST),
        (HIGH, 1_700_000_000.25, 60.0, 1_699_999_940.25),
        (NORMAL, 1_700_000_000.25, 60.0, 1_700_000_000.25),
    ],
)
def test_order_score(priority: Priority, enqueued_at: float, boost: float, score: float) -> None:
    assert order_score(priority, enqueued_at, boost) == score


@dataclass(frozen=True)
class Queued:
    run_id: str
    priority: Priority
    enqueued_at: float

    def key(self, boost: float = BOOST) -> tuple[float, str]:
        return sort_key(order_score(self.priority, self.enqueued_at, boost), self.run_id)


def _order(runs: list[Queued], boost: float = BOOST) -> list[str]:
    return [run.run_id for run in sorted(runs, key=lambda run: run.key(boost))]


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        pytest.param(
            [Queued("n1", NORMAL, 0), Queued("n2", NORMAL, 10), Queued("n3", NORMAL, 20)],
            ["n1", "n2", "n3"],
            id="normal-runs-in-enqueue-order",
        ),
        pytest.param(
            [Queued("n1", NORMAL, 0), Queued("n2", NORMAL, 10), Queued("h1", HIGH, 20)],
            ["h1", "n1", "n2"],
            id="a-later-high-run-goes-first",
        ),
        pytest.param(
            [Queued("h2", HIGH, 30), Queued("h1", HIGH, 20), Queued("n1", NORMAL, 0)],
            ["h1", "h2", "n1"],
            id="high-runs-in-enqueue-order",
        ),
        pytest.param(
            [Queued("n1", NORMAL, 0), Queued("h1", HIGH, BOOST + 1)],
            ["n1", "h1"],
            id="aging-a-normal-run-waiting-longer-than-the-boost-stays-ahead",
        ),
        pytest.param(
            [Queued("n1", NORMAL, 0), Queued("h1", HIGH, BOOST - 1)],
            ["h1", "n1"],
            id="a-high-run-within-the-boost-overtakes",
        ),
        pytest.param(
            [Queued("b", NORMAL, 5), Queued("a", NORMAL, 5), Queued("c", HIGH, 5 + BOOST)],
            ["a", "b", "c"],
            id="equal-scores-fall-back-to-the-run-id",
        ),
    ],
)
def test_queue_order(runs: list[Queued], expected: list[str]) -> None:
    assert _order(runs) == expected
    assert _order(runs[::-1]) == expected


@pytest.mark.parametrize(
    ("score", "old", "new", "expected"),
    [
        (1_000.0, NORMAL, HIGH, 1_000.0 - BOOST),
        (1_000.0 - BOOST, HIGH, NORMAL, 1_000.0),
        (1_000.0, NORMAL, NORMAL, 1_000.0),
        (1_000.0, HIGH, HIGH, 1_000.0),
        # A run moved to the top keeps its head start when its priority changes.
        (-5.0, NORMAL, HIGH, -5.0 - BOOST),
    ],
)
def test_rescore(score: float, old: Priority, new: Priority, expected: float) -> None:
    assert rescore(score, old, new, BOOST) == expected


def test_rescore_gives_the_score_of_a_run_enqueued_with_the_new_priority() -> None:
    for old, new in [(NORMAL, HIGH), (HIGH, NORMAL)]:
        score = order_score(old, 1_700_000_000.5, BOOST)
        assert rescore(score, old, new, BOOST) == order_score(new, 1_700_000_000.5, BOOST)


def test_raising_priority_moves_a_run_ahead_of_earlier_normal_runs() -> None:
    runs = [Queued("n1", NORMAL, 0), Queued("n2", NORMAL, 10), Queued("n3", NORMAL, 20)]
    keys = {run.run_id: run.key() for run in runs}
    keys["n3"] = sort_key(rescore(keys["n3"][0], NORMAL, HIGH, BOOST), "n3")
    assert sorted(keys, key=keys.__getitem__) == ["n3", "n1", "n2"]


@pytest.mark.parametrize(
    ("head", "fallback", "expected"),
    [
        (None, 1_000.0, 1_000.0),  # empty queue: the run's own score
        (500.0, 1_000.0, 499.0),
        (2_000.0, 1_000.0, 999.0),  # the moved run's own score is already lower
        (-3_600.0, 10.0, -3_601.0),
    ],
)
def test_top_score(head: float | None, fallback: float, expected: float) -> None:
    assert top_score(head, fallback) == expected


def test_the_most_recently_moved_run_goes_first() -> None:
    scores = {"n1": 0.0, "n2": 10.0, "h1": 20.0 - BOOST}
    for moved in ["n2", "n1"]:
        head = min(scores.values())
        scores[moved] = top_score(head, scores[moved])
    order = sorted(scores, key=lambda run_id: sort_key(scores[run_id], run_id))
    assert order == ["n1", "n2", "h1"]
