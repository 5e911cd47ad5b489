"""Predicted starts: the queue played forward through the placer's rules and the service model."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.codes import ErrorCode
from dispatcher.core.forecast import (
    Confidence,
    Occupant,
    Outlook,
    Prediction,
    QueuedRun,
    predict_starts,
)
from dispatcher.core.ordering import lane_of
from dispatcher.core.service_model import ServiceModel
from dispatcher.models import AssignedRun, ConnectionKind, MachineView, Mode
from tests.support.builders import ACTIVE, ATTENDED, ROBOT, UNATTENDED, credentials, machine, view

from .scenarios import (
    FLOWS,
    HOUR,
    actual_waits,
    burst,
    learned_model,
    median_relative_error,
    users,
)

pytestmark = pytest.mark.unit

NOW = 10_000.0
CREDENTIALS = ConnectionKind.credentials


def model_of(slot_times: dict[str, float], runs: int = 40, lag: float = 0.0) -> ServiceModel:
    """A model that has seen ``runs`` runs of each flow, each taking exactly its slot time."""
    model = ServiceModel()
    for index in range(runs):
        for flow, seconds in slot_times.items():
            at = NOW - 1000 + index
            model.observe(
                CREDENTIALS, flow, dispatched_at=at - seconds, finished_at=at,
                started_at=at - seconds + lag,
            )  # fmt: skip
    return model


def busy(machine_id: str, *runs: tuple[str, str]) -> MachineView:
    """A server machine with 2 slots running ``runs`` (run id, user), unattended."""
    return view(machine(machine_id, slots=2)).model_copy(
        update={
            "assigned": tuple(
                AssignedRun(run_id=run_id, mode=Mode.unattended, user=user, fence=1)
                for run_id, user in runs
            )
        }
    )


def queued(run_id: str, connection: str = "c0", flow: str = "f", **kw: Any) -> QueuedRun:
    return QueuedRun(run_id, connection, kw.pop("mode", UNATTENDED), flow, **kw)


def test_a_run_that_fits_now_starts_after_the_start_lag_for_sure() -> None:
    model = model_of({"f": 10.0}, lag=0.3)
    [prediction] = predict_starts([queued("r1")], [busy("m1")], users(1), model, NOW)
    assert prediction.outlook is Outlook.starts
    assert prediction.start_at == pytest.approx(NOW + 0.3)
    assert (prediction.confidence, prediction.spread, prediction.samples) == (
        Confidence.high,
        0.0,
        None,
    )


def test_a_run_behind_a_busy_user_waits_for_the_rest_of_the_run_in_progress() -> None:
    model = model_of({"f": 10.0, "long": 100.0})
    # c0's account already runs "long" (60 s in): one run per user and machine at a time.
    views = [busy("m1", ("running", "contoso\\bot0"))]
    occupants = {"running": Occupant(since=NOW - 60, kind=CREDENTIALS, flow_id="long")}
    first, second = predict_starts(
        [queued("r1"), queued("r2")], views, users(1), model, NOW, occupants=occupants
    )
    assert first.start_at == pytest.approx(NOW + 40)
    assert second.start_at == pytest.approx(NOW + 50)
    assert first.confidence is Confidence.high  # every slot time here is exact


def test_an_unknown_run_in_progress_counts_as_just_dispatched() -> None:
    model = model_of({"f": 10.0})
    views = [busy("m1", ("running", "contoso\\bot0"))]
    [prediction] = predict_starts([queued("r1")], views, users(1), model, NOW)
    assert prediction.start_at == pytest.approx(NOW + 10)


def test_each_run_is_expected_to_take_its_own_flows_time() -> None:
    model = model_of({"quick": 1.0, "slow": 9.0})
    runs = [queued("a", flow="slow"), queued("b", flow="quick"), queued("c", flow="slow")]
    starts = [p.start_at for p in predict_starts(runs, [busy("m1")], users(1), model, NOW)]
    assert starts == [pytest.approx(NOW), pytest.approx(NOW + 9), pytest.approx(NOW + 10)]


def test_the_hand_over_time_adds_to_every_slot_time() -> None:
    model = model_of({"f": 10.0})
    model.observe_handover(0.5, at=NOW)
    runs = [queued("a"), queued("b"), queued("c")]
    starts = [p.start_at for p in predict_starts(runs, [busy("m1")], users(1), model, NOW)]
    assert starts == [pytest.approx(NOW), pytest.approx(NOW + 10.5), pytest.approx(NOW + 21)]


def test_a_run_no_machine_can_take_gets_the_reasons_instead_of_a_time() -> None:
    model = model_of({"f": 10.0})
    connections = users(1)  # connection "gone" was deleted since its run was queued
    views = [busy("m1"), view(machine("m2"), online=False)]
    runs = [
        queued("attended", mode=ATTENDED),  # nobody logged in anywhere
        queued("orphan", connection="gone"),
        queued("fine"),
    ]
    attended, orphan, fine = predict_starts(runs, views, connections, model, NOW)
    assert attended.outlook is Outlook.no_machine and attended.start_at is None
    assert attended.reasons == {
        "m1": ErrorCode.AttendedUserNotLoggedIn,
        "m2": ErrorCode.MachineOffline,
    }
    assert orphan.reasons == {
        "m1": ErrorCode.ConnectionNotFound,
        "m2": ErrorCode.ConnectionNotFound,
    }
    # Skip-ahead: the runs that cannot go do not hold up the one that can.
    assert fine.start_at == pytest.approx(NOW)


def test_an_attended_run_starts_when_its_users_session_is_free() -> None:
    model = model_of({"f": 10.0})
    session_machine = view(machine("m1"), sessions=((ROBOT, ACTIVE),))
    runs = [queued("a", mode=ATTENDED), queued("b", mode=ATTENDED)]
    connections = {"c0": credentials(connection_id="c0")}
    first, second = predict_starts(runs, [session_machine], connections, model, NOW)
    assert (first.start_at, second.start_at) == (pytest.approx(NOW), pytest.approx(NOW + 10))


def test_a_run_that_times_out_leaves_and_the_runs_behind_it_move_up() -> None:
    model = model_of({"f": 100.0})
    views = [busy("m1", ("running", "contoso\\bot0"))]
    runs = [
        queued("impatient", queue_deadline=NOW + 30),
        queued("patient", queue_deadline=NOW + HOUR),
        queued("patient-too", queue_deadline=NOW + HOUR),
    ]
    impatient, patient, after = predict_starts(runs, views, users(1), model, NOW)
    assert impatient.outlook is Outlook.times_out and impatient.start_at is None
    # Its slot frees 70 s after its deadline: a clear miss.
    assert impatient.confidence is Confidence.high
    assert patient.start_at == pytest.approx(NOW + 100)
    assert after.start_at == pytest.approx(NOW + 200)


def test_a_run_past_its_deadline_is_not_placed_even_on_a_free_slot() -> None:
    model = model_of({"f": 10.0})
    overdue, fine = predict_starts(
        [queued("overdue", queue_deadline=NOW - 1), queued("fine", queue_deadline=NOW + 5)],
        [busy("m1")],
        users(1),
        model,
        NOW,
    )
    assert (overdue.outlook, overdue.start_at) == (Outlook.times_out, None)
    assert fine.start_at == pytest.approx(NOW)


def test_without_history_a_prediction_is_made_from_the_prior_with_low_confidence() -> None:
    model = ServiceModel(prior_s=30.0)
    runs = [queued("a"), queued("b"), queued("c")]
    a, b, c = predict_starts(runs, [busy("m1")], users(1), model, NOW)
    assert a.confidence is Confidence.high  # starts at once: no history needed
    assert (b.start_at, b.confidence, b.samples) == (pytest.approx(NOW + 30), Confidence.low, 0)
    assert c.start_at == pytest.approx(NOW + 60)


def test_confidence_follows_the_spread_of_the_slot_times() -> None:
    rng = random.Random(3)
    tight, wide = ServiceModel(), ServiceModel()
    for index in range(100):
        at = NOW - 1000 + index
        tight.observe(CREDENTIALS, "f", dispatched_at=at - rng.uniform(9, 11), finished_at=at)
        wide.observe(CREDENTIALS, "f", dispatched_at=at - rng.choice([1, 19]), finished_at=at)
    runs = [queued(f"r{i}") for i in range(4)]
    sure = predict_starts(runs, [busy("m1")], users(1), tight, NOW)
    unsure = predict_starts(runs, [busy("m1")], users(1), wide, NOW)
    assert [p.confidence for p in sure[1:]] == [Confidence.high] * 3
    assert unsure[1].confidence is Confidence.low  # 1 s or 19 s: a coin flip
    # Later runs wait for more slot times, whose spreads partly cancel out.
    assert unsure[3].spread is not None and unsure[1].spread is not None
    assert unsure[3].spread < unsure[1].spread


# --- properties -----------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[MachineView], list[QueuedRun], dict[str, Occupant]]:
    machines = draw(st.integers(1, 3))
    views: list[MachineView] = []
    occupants: dict[str, Occupant] = {}
    for index in range(machines):
        running = draw(st.lists(st.integers(0, 3), max_size=2, unique=True))
        runs = [(f"m{index}-busy{user}", f"contoso\\bot{user}") for user in running]
        for run_id, _ in runs:
            occupants[run_id] = Occupant(
                since=NOW - draw(st.floats(0, 5)), kind=CREDENTIALS, flow_id="quick"
            )
        slots = draw(st.integers(max(1, len(runs)), 3))
        views.append(
            view(machine(f"m{index}", slots=slots)).model_copy(
                update={
                    "assigned": tuple(
                        AssignedRun(run_id=r, mode=Mode.unattended, user=u, fence=1)
                        for r, u in runs
                    )
                }
            )
        )
    count = draw(st.integers(1, 25))
    queue = [
        QueuedRun(
            f"r{index}",
            f"c{draw(st.integers(0, 3))}",
            Mode.unattended,
            draw(st.sampled_from(list(FLOWS))),
            NOW + draw(st.floats(1, 60)),
        )
        for index in range(count)
    ]
    return views, queue, occupants


@settings(max_examples=150, deadline=None)
@given(workload=workloads(), seed=st.integers(0, 1000))
def test_predictions_are_monotone_in_queue_position_within_a_lane(workload: Any, seed: int) -> None:
    views, queue, occupants = workload
    model = learned_model(random.Random(seed))
    predictions = predict_starts(queue, views, users(4), model, NOW, occupants=occupants)
    last: dict[str, float] = {}
    for run, prediction in zip(queue, predictions, strict=True):
        assert prediction.outlook is not Outlook.no_machine
        if prediction.start_at is None:
            continue
        assert prediction.start_at >= NOW
        lane = lane_of(run.connection_id, run.mode, run.priority)
        assert prediction.start_at >= last.get(lane, NOW)
        last[lane] = prediction.start_at
        # A run predicted to start made its deadline (less the start lag, 0 here).
        assert run.queue_deadline is not None and prediction.start_at <= run.queue_deadline


@settings(max_examples=100, deadline=None)
@given(workload=workloads(), seed=st.integers(0, 1000))
def test_the_same_facts_give_the_same_predictions(workload: Any, seed: int) -> None:
    views, queue, occupants = workload
    model = learned_model(random.Random(seed))
    first = predict_starts(queue, views, users(4), model, NOW, occupants=occupants, seed=seed)
    again = predict_starts(queue, views, users(4), model, NOW, occupants=occupants, seed=seed)
    assert first == again
    assert [p.run_id for p in first] == [run.run_id for run in queue]


# --- against the naive formula --------------------------------------------------------------


def naive_waits(queue: list[QueuedRun], model: ServiceModel, slots: int) -> dict[str, float]:
    """Position x mean slot time / slots, from the same history."""
    mean = model.estimate(CREDENTIALS, None, NOW).mean
    return {run.run_id: index * mean / slots for index, run in enumerate(queue)}


@pytest.mark.parametrize("seed", range(10))
def test_with_mixed_flows_the_forecast_beats_position_times_mean_over_slots(seed: int) -> None:
    """One machine with 2 slots, 30 runs of 1-3 s from two accounts (one run per account and
    machine at a time, so both slots are used), predicted at enqueue against the actual waits
    of the same runs with their true slot times."""
    rng = random.Random(seed)
    model = learned_model(rng)
    scenario = burst(rng, count=30, connections=2, now=NOW)
    connections = users(2)
    views = [view(machine("m1", slots=2))]
    predictions: list[Prediction] = predict_starts(scenario.queued, views, connections, model, NOW)
    assert all(p.start_at is not None for p in predictions)
    forecast = {p.run_id: (p.start_at or 0.0) - NOW for p in predictions}
    actual = actual_waits(scenario, views, connections)
    ours = median_relative_error(forecast, actual)
    naive = median_relative_error(naive_waits(scenario.queued, model, 2), actual)
    print(f"seed {seed}: median relative error forecast {ours:.3f}, naive {naive:.3f}")
    assert ours < 0.25
    assert ours < naive
