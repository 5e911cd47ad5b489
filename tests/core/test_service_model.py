"""The service model: decayed slot-time statistics per kind and flow, quantiles, storage form."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.core.durations import DurationStats
from dispatcher.core.service_model import FLOW_MIN_SAMPLES, MAX_FLOWS, RECENT_FINISHES, ServiceModel
from dispatcher.core.trace import TraceRecord
from dispatcher.models import ConnectionKind, Mode, Priority, RunStatus

pytestmark = pytest.mark.unit

CREDENTIALS = ConnectionKind.credentials
SIGN_IN = ConnectionKind.sign_in
HOUR = 3600.0


def observe(
    model: ServiceModel, flow: str | None, slot_time: float, at: float, **kw: float
) -> None:
    kind = kw.pop("kind", CREDENTIALS)
    assert isinstance(kind, ConnectionKind)
    model.observe(kind, flow, dispatched_at=at - slot_time, finished_at=at, **kw)


def test_without_history_the_prior_is_used_with_no_samples() -> None:
    model = ServiceModel(prior_s=42.0)
    estimate = model.estimate(CREDENTIALS, "f", now=0.0)
    assert (estimate.level, estimate.mean, estimate.samples) == ("prior", 42.0, 0.0)
    assert estimate.low(0.05) == 0.0  # nothing optimistic can be said without history
    assert model.start_lag(CREDENTIALS) == 0.0


def test_a_flow_with_enough_samples_wins_over_its_kind() -> None:
    model = ServiceModel()
    for index in range(10):
        observe(model, "slow", 30.0, at=float(index))
    observe(model, "quick", 1.0, at=10.0)
    observe(model, "quick", 1.0, at=11.0)
    # Two samples of "quick" are not enough: its runs are expected to take the kind's mean.
    thin = model.estimate(CREDENTIALS, "quick", now=11.0)
    assert thin.level == "kind"
    assert thin.mean == pytest.approx((10 * 30 + 2) / 12, rel=1e-3)
    observe(model, "quick", 1.0, at=12.0)
    assert 2 < FLOW_MIN_SAMPLES <= 3
    own = model.estimate(CREDENTIALS, "quick", now=12.0)
    assert (own.level, own.mean) == ("flow", pytest.approx(1.0))
    # Another kind without history falls back to the whole target, an unknown kind too.
    assert model.estimate(SIGN_IN, "quick", now=12.0).level == "target"
    assert model.estimate(None, None, now=12.0).level == "target"


def test_statistics_decay_with_the_half_life_in_wall_clock_time() -> None:
    model = ServiceModel(half_life_s=HOUR)
    for index in range(8):
        observe(model, "f", 10.0, at=float(index))
    assert model.samples(CREDENTIALS, now=7.0) == pytest.approx(8.0, rel=1e-2)
    assert model.samples(CREDENTIALS, now=7.0 + HOUR) == pytest.approx(4.0, rel=1e-2)
    assert model.samples(CREDENTIALS, now=7.0 + 3 * HOUR) == pytest.approx(1.0, rel=1e-2)
    # New runs outweigh old ones: the mean follows a flow that got slower.
    for index in range(8):
        observe(model, "f", 20.0, at=7.0 + 2 * HOUR + index)
    assert model.estimate(CREDENTIALS, "f", now=8 * HOUR).mean == pytest.approx(18.0, rel=0.02)


def test_a_late_report_counts_as_old_as_it_is() -> None:
    model = ServiceModel(half_life_s=HOUR)
    observe(model, "f", 10.0, at=2 * HOUR)
    observe(model, "f", 40.0, at=HOUR)  # finished an hour earlier, reported now
    stats = model.kinds[CREDENTIALS.value]
    assert stats.weight == pytest.approx(1.5)
    assert stats.mean == pytest.approx((10 + 0.5 * 40) / 1.5)


def test_completion_rate_is_the_decayed_count_over_its_window() -> None:
    model = ServiceModel(half_life_s=HOUR)
    # One run a minute for ten half-lives: the rate converges to 1/60 per second.
    for minute in range(600):
        observe(model, "f", 5.0, at=60.0 * minute)
    assert model.completion_rate(CREDENTIALS, now=60.0 * 599) == pytest.approx(1 / 60, rel=0.02)


def test_quantiles_and_remaining_time_come_from_the_histogram() -> None:
    stats = DurationStats()
    for _ in range(50):
        stats.add(1.0, 0.0, HOUR)
        stats.add(60.0, 0.0, HOUR)
    assert stats.quantile(0.25) == pytest.approx(1.0)
    assert stats.quantile(0.75) == pytest.approx(60.0)
    # 50 s in, the run is one of the 60 s ones: 10 s to go, not "mean - elapsed" < 0.
    rest, variance = stats.remaining(50.0)
    assert rest == pytest.approx(10.0)
    assert variance == pytest.approx(0.0, abs=1e-6)
    assert stats.quantile(0.05, above=50.0) == pytest.approx(10.0)
    # Past every recorded slot time: it is assumed to end soon, with a wide spread.
    rest, variance = stats.remaining(100.0)
    assert rest == pytest.approx(10.0)
    assert math.sqrt(variance) == pytest.approx(rest)
    assert stats.remaining(0.0) == (stats.mean, stats.variance)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 1e5, allow_nan=False), min_size=1, max_size=40),
    p=st.floats(0.0, 1.0),
    q=st.floats(0.0, 1.0),
    elapsed=st.floats(0.0, 1e5, allow_nan=False),
)
def test_quantiles_are_ordered_and_within_the_values(
    values: list[float], p: float, q: float, elapsed: float
) -> None:
    stats = DurationStats()
    for value in values:
        stats.add(value, 0.0, HOUR)
    low, high = sorted((p, q))
    assert stats.quantile(low) <= stats.quantile(high) + 1e-9
    # A bucket stands for the mean of its values, which lies between the extremes.
    assert min(values) * (1 - 1e-9) <= stats.quantile(0.0) <= stats.quantile(1.0)
    assert stats.quantile(1.0) <= max(values) * (1 + 1e-9) + 1e-12
    rest, variance = stats.remaining(elapsed)
    assert rest >= 0 and variance >= 0
    assert stats.quantile(p, above=elapsed) >= -1e-9


def test_flows_per_kind_are_bounded_and_the_stalest_one_goes() -> None:
    model = ServiceModel()
    for index in range(MAX_FLOWS):
        observe(model, f"flow-{index}", 1.0, at=float(index))
    observe(model, "flow-0", 1.0, at=float(MAX_FLOWS))  # flow-0 is fresh again
    observe(model, "newcomer", 1.0, at=float(MAX_FLOWS + 1))
    flows = model.flows[CREDENTIALS.value]
    assert len(flows) == MAX_FLOWS
    assert "newcomer" in flows and "flow-0" in flows and "flow-1" not in flows


def test_the_stored_form_is_compact_json_and_reads_back_the_same_estimates() -> None:
    model = ServiceModel(half_life_s=2 * HOUR, prior_s=30.0)
    rng = random.Random(7)
    for index in range(500):
        flow = f"flow-{index % 5}"
        slot_time = (1 + index % 5) * rng.uniform(0.8, 1.2)
        observe(model, flow, slot_time, at=10.0 * index, started_at=10.0 * index - slot_time + 0.2)
        observe(model, flow, slot_time * 3, at=10.0 * index + 1, kind=SIGN_IN)
    stored = json.dumps(model.to_dict())
    assert len(stored) < 6000  # 2 kinds x 5 flows, a few buckets each
    again = ServiceModel.from_dict(json.loads(stored))
    now = 5000.0
    for kind in ConnectionKind:
        for flow in ("flow-1", "flow-4", None):
            before, after = model.estimate(kind, flow, now), again.estimate(kind, flow, now)
            assert (after.level, after.mean) == (before.level, pytest.approx(before.mean, 1e-5))
            assert after.low(0.05) == pytest.approx(before.low(0.05), rel=1e-4)
        assert again.start_lag(kind) == pytest.approx(model.start_lag(kind), rel=1e-4)
    assert again.start_lag(CREDENTIALS) == pytest.approx(0.2, rel=1e-3)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        {"v": 99},
        {"v": 1, "h": 0},
        {"v": 1, "k": {"password": {}}},
        {"v": 1, "k": {"credentials": {"w": "many"}}},
        {"v": 1, "k": {"credentials": {"w": float("nan")}}},
        {"v": 1, "k": {"credentials": {"w": -1.0}}},
        {"v": 1, "k": {"credentials": {"b": [1, 2]}}},
        {"v": 1, "k": {"credentials": {"b": {"3": 1.0}}}},
        {"v": 1, "f": {"credentials": {f"f{i}": {} for i in range(MAX_FLOWS + 1)}}},
    ],
)
def test_a_broken_stored_form_is_refused_with_a_reason(raw: object) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        ServiceModel.from_dict(raw)


def ran(
    run_id: str, machine: str, queued: float, dispatched: float, finished: float
) -> TraceRecord:
    return TraceRecord(
        run_id=run_id, target="g:g", connection_id="c1", kind=CREDENTIALS, mode=Mode.unattended,
        priority=Priority.normal, flow_id="f", queued_at=queued, queue_deadline=queued + HOUR,
        status=RunStatus.succeeded, dispatched_at=dispatched, started_at=dispatched + 0.1,
        finished_at=finished, machine_id=machine,
    )  # fmt: skip


def test_learning_from_trace_records_gives_slot_times_lags_and_hand_overs() -> None:
    # One slot on m1: each run waits for the one before and is handed over 0.2 s after it
    # finished; the first one did not wait. A run that timed out in the queue teaches nothing.
    records = [ran("r0", "m1", 0.0, 0.0, 3.0)]
    for index in range(1, 10):
        previous = records[-1].finished_at or 0.0
        records.append(ran(f"r{index}", "m1", 0.0, previous + 0.2, previous + 3.2))
    timed_out = TraceRecord(
        run_id="late", target="g:g", connection_id="c1", kind=CREDENTIALS, mode=Mode.unattended,
        priority=Priority.normal, flow_id="f", queued_at=0.0, queue_deadline=1.0,
        status=RunStatus.timed_out,
    )  # fmt: skip
    model = ServiceModel()
    finishes: dict[str, list[float]] = {}
    assert model.learn([*records[:5], timed_out], finishes) == 5
    assert model.learn(records[5:], finishes) == 5  # the finishes carry over between calls
    estimate = model.estimate(CREDENTIALS, "f", now=40.0)
    assert (estimate.level, estimate.mean) == ("flow", pytest.approx(3.0))
    assert model.start_lag(CREDENTIALS) == pytest.approx(0.1)
    assert model.handover == pytest.approx(0.2)
    assert model.handovers.weight == pytest.approx(9, rel=0.01)
    assert len(finishes["m1"]) == 10 <= RECENT_FINISHES


def test_a_run_queued_after_the_slot_freed_gives_no_hand_over() -> None:
    model = ServiceModel()
    finishes: dict[str, list[float]] = {}
    model.learn([ran("a", "m1", 0.0, 0.0, 5.0), ran("b", "m1", 9.0, 9.0, 12.0)], finishes)
    assert model.handovers.weight == 0
    assert model.handover == 0.0
