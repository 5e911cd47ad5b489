"""The chaos test's verdicts (``check_witnesses``) see each fault they are there to see: a run
executed twice, on the wrong machine, with two terminal events or none, a run that fails by
design ending otherwise."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.models import Run
from tests.chaos.test_chaos import KILLED_WORKER, check_witnesses
from tests.support.witness import Event, Witnessed

pytestmark = pytest.mark.unit


def run(status: str = "succeeded", machine: str = "m1", fence: int = 3, **extra: Any) -> Run:
    return Run.model_validate(
        {
            "run_id": "r1",
            "flow_id": "f",
            "connection_id": "c1",
            "requested_by": "o",
            "mode": "unattended",
            "status": status,
            "machine_id": machine,
            "fence": fence,
            **extra,
        }
    )


def ended(status: str = "succeeded", machine: str = "m1") -> dict[str, list[Event]]:
    return {"r1": [Event("1-0", f"run.{status}", "r1", status, machine, 3)]}


def problems(
    record: Run,
    seen: list[Witnessed],
    events: dict[str, list[Event]],
    by_design: dict[str, str] | None = None,
) -> list[str]:
    return check_witnesses(["r1"], [record], seen, events, [], 1, by_design or {})[0]


def test_a_run_witnessed_once_where_its_record_says_is_fine() -> None:
    assert problems(run(), [Witnessed("r1", 3, "m1", 0.0)], ended()) == []


@pytest.mark.parametrize(
    ("seen", "events", "says"),
    [
        ([Witnessed("r1", 3, "m1", 0), Witnessed("r1", 4, "m2", 0)], ended(), "executed 2 times"),
        ([], ended(), "succeeded with 0 witnessed executions"),
        ([Witnessed("r1", 2, "m2", 0)], ended(), "ran on m2 (fence 2), record says m1"),
        ([Witnessed("r1", 3, "m1", 0)], {"r1": ended()["r1"] * 2}, "terminal events"),
        ([Witnessed("r1", 3, "m1", 0)], {}, "terminal events []"),
        ([Witnessed("r1", 3, "m1", 0)], ended("failed"), "terminal events ['run.failed']"),
        ([Witnessed("r1", 3, "m1", 0)], ended(machine="m2"), "event on m2"),
        ([Witnessed("r9", 3, "m1", 0), Witnessed("r1", 3, "m1", 0)], ended(), "never submitted"),
    ],
)
def test_each_fault_is_a_problem(
    seen: list[Witnessed], events: dict[str, list[Event]], says: str
) -> None:
    found = problems(run(), seen, events)
    assert any(says in line for line in found), found


def test_a_worker_restarted_run_is_fine_only_on_the_killed_machine() -> None:
    error = {"error": {"code": "WorkerRestarted", "message": "x"}}
    on_killed = run("failed", KILLED_WORKER, **error)
    seen = [Witnessed("r1", 3, KILLED_WORKER, 0)]
    assert problems(on_killed, seen, ended("failed", KILLED_WORKER)) == []
    elsewhere = run("failed", "m1", **error)
    assert problems(elsewhere, seen, ended("failed")) != []


@pytest.mark.parametrize(
    ("expected", "code", "executions", "ok"),
    [
        ("ExecutorFailed", "ExecutorFailed", 0, True),
        ("ExecutorFailed", "ExecutorFailed", 1, False),  # the executor raised, yet it ran
        ("OutputsTooLarge", "OutputsTooLarge", 1, True),
        ("OutputsTooLarge", "OutputsTooLarge", 0, False),
        ("ExecutorFailed", "FlowFailed", 0, False),  # another code than the one by design
    ],
)
def test_a_run_failing_by_design_must_fail_with_its_code(
    expected: str, code: str, executions: int, ok: bool
) -> None:
    failed = run("failed", **{"error": {"code": code, "message": "x"}})
    seen = [Witnessed("r1", 3, "m1", 0)] * executions
    found = problems(failed, seen, ended("failed"), {"r1": expected})
    assert (found == []) is ok, found


def test_a_run_failing_by_design_that_succeeds_is_a_problem() -> None:
    found = problems(run(), [Witnessed("r1", 3, "m1", 0)], ended(), {"r1": "ExecutorFailed"})
    assert any("by design ExecutorFailed" in line for line in found), found
