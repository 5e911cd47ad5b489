"""The metric definitions: names, units, bounded labels, and the queue-state snapshot.

Label policy. A label may only hold a closed vocabulary (error codes, statuses, reason classes)
or a fleet-bounded id (``target``: a queue key, ``group``: a machine group id), or, on ``_info``
metrics only, a value fixed per process (version). Per-run or per-person values (run ids, users,
flows, connections, message text) are forbidden. ``machine``/``machine_id`` are forbidden too,
although the fleet bounds them: a per-machine label would multiply every dispatcher series by up
to 1,000 machines, while groups carry what operators act on; each worker is its own scrape
target, so Prometheus' ``instance`` (and the ``machine`` target label of the scrape
configuration) already names the machine of worker metrics.
"""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from dispatcher import metrics
from dispatcher.codes import ErrorCode
from dispatcher.metrics import (
    DISPATCHER_SPECS,
    OTHER,
    QUEUE_STATE_SPECS,
    WORKER_SPECS,
    Bound,
    DispatcherMetrics,
    QueueStateSnapshot,
    QueueStats,
    SlotCounts,
    WorkerMetrics,
    exported_names,
    label_values_bounded,
)

pytestmark = pytest.mark.unit

ALL_SPECS = (*DISPATCHER_SPECS, *WORKER_SPECS)

FORBIDDEN_LABELS = frozenset(
    {
        "run_id", "run", "user", "username", "requested_by", "owner", "account", "flow_id",
        "flow", "connection_id", "connection", "machine_id", "machine", "session", "message",
        "error", "detail", "reason_text", "inputs", "tenant_id", "fence",
    }
)  # fmt: skip
FLEET_BOUNDED_LABELS = frozenset({"target", "group"})
# Counted things are their own unit, as in Prometheus' own `..._requests_total`.
COUNT_UNITS = ("_runs", "_machines", "_slots", "_events")
# ``_timeouts``: queued runs predicted to time out (the name the alerts and runbooks use).
GAUGE_UNITS = ("_seconds", "_bytes", "_timeouts", *COUNT_UNITS)
# Run-scoped values a caller could pass by mistake: none may come out as a label value.
UNBOUNDED_VALUES = ("run-7f3a9c", "alice@contoso.com", "flow 42 failed: boom", "c1", "x" * 300)


def collect(registry: CollectorRegistry) -> dict[str, Metric]:
    return {family.name: family for family in registry.collect()}


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one series name, keyed by sorted labels."""
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def exercised() -> CollectorRegistry:
    """A registry where every method of both metric classes has been called, some oddly."""
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    worker = WorkerMetrics(registry, executor="simulator")
    dispatcher.run_submitted("g:finance", "credentials", "unattended")
    dispatcher.run_rejected(None, None, None, ErrorCode.ConnectionNotFound)
    dispatcher.run_rejected(
        "m:m2", "sign_in", "unattended", "UnattendedUnsupportedForConnectWithSignIn"
    )
    dispatcher.run_dispatched("g:finance", "credentials", "unattended")
    dispatcher.queue_wait(12.5, "g:finance", "credentials")
    dispatcher.run_completed(
        "g:finance", "credentials", "unattended", status="succeeded", code=None, duration_s=30.0
    )
    dispatcher.run_completed(
        "g:finance", "credentials", "attended", status="failed", code="FlowFailed", duration_s=3
    )
    dispatcher.run_timed_out("m:m2", "sign_in", "attended")
    dispatcher.decision_latency(0.002)
    dispatcher.token_refresh("success", 0.05)
    dispatcher.token_refresh("permanent_failure", 0.2)
    dispatcher.dead_letter("schema")
    dispatcher.message_refused("key_mismatch")
    dispatcher.event_published("run.queued")
    dispatcher.event_published("succeeded", 3)
    dispatcher.set_outbox_backlog(4)
    dispatcher.set_up(True)
    dispatcher.set_queue_state(
        QueueStateSnapshot(
            now=1000.0,
            queues={
                ("g:finance", "normal"): QueueStats(3, 940.0),
                ("m:m2", "high"): QueueStats(1, 10),
            },
            waiting={("g:finance", "NoFreeSlot"): 3, ("m:m2", "NoSessionFoundForPasswordless"): 1},
            oldest_sign_in_enqueued_at={"m:m2": 10.0},
            machines={("finance", "online"): 2, ("none", "offline"): 1},
            slots={"finance": SlotCounts(busy=2, free=0)},
        )
    )
    # Values from outside every closed vocabulary, and things that are no fleet id.
    for junk in UNBOUNDED_VALUES:
        dispatcher.run_submitted("g:finance", junk, junk)
        dispatcher.run_rejected("not a target id!", junk, junk, junk)
        dispatcher.run_completed("g:finance", junk, junk, status=junk, code=junk, duration_s=1)
        dispatcher.token_refresh(junk, 0.1)
        dispatcher.dead_letter(junk)
        dispatcher.event_published(junk)
        worker.run_executed(junk, 1.0, code=junk)
        worker.executor_error(junk)
    worker.run_executed("succeeded", 30.0)
    worker.run_executed("failed", 5.0, code=ErrorCode.DesktopFlowsActionTimeout)
    worker.heartbeat_sent()
    worker.heartbeat_failed()
    worker.set_running_runs(2)
    worker.executor_error("crashed")
    return registry


# ---- names and units --------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda spec: spec.name)
def test_name_has_prefix_and_base_unit(spec: metrics.MetricSpec) -> None:
    assert re.fullmatch(r"rundispatch_[a-z][a-z0-9_]*", spec.name)
    if spec.kind == "counter":
        assert spec.name.endswith("_total")
        assert not spec.name.removesuffix("_total").endswith(("_seconds_total", "_bytes_total"))
    elif spec.kind == "histogram":
        assert spec.name.endswith(("_seconds", "_bytes"))
        assert spec.buckets == tuple(sorted(spec.buckets))
    else:
        # Gauges: a unit, or `_info` (constant 1, labels describe the process), or `_up` (0/1).
        assert spec.name.endswith((*GAUGE_UNITS, "_info")) or spec.name == "rundispatch_up"
    # Milliseconds, minutes and percentages are not base units.
    assert not re.search(r"_(ms|milliseconds|minutes|hours|percent|kb|mb)(_|$)", spec.name)


def test_names_are_unique_and_registry_holds_exactly_the_specs() -> None:
    registry = CollectorRegistry()
    DispatcherMetrics(registry)
    WorkerMetrics(registry)
    families = collect(registry)
    expected = {spec.name.removesuffix("_total"): spec.kind for spec in ALL_SPECS}
    assert len(expected) == len(ALL_SPECS)
    assert {name: family.type for name, family in families.items()} == expected


def test_exported_names_include_type_suffixes() -> None:
    registry = CollectorRegistry()
    DispatcherMetrics(registry)
    WorkerMetrics(registry)
    names = exported_names(registry)
    for spec in ALL_SPECS:
        if spec.kind == "histogram":
            assert {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"} <= names
        else:
            assert spec.name in names


# ---- bounded labels ---------------------------------------------------------------------------


def test_every_label_is_declared_closed_or_bounded() -> None:
    declarations = label_values_bounded()
    assert set(declarations) == {spec.name for spec in ALL_SPECS}
    for name, labels in declarations.items():
        for label, vocabulary in labels.items():
            where = f"{name}{{{label}}}"
            assert label not in FORBIDDEN_LABELS, where
            assert re.fullmatch(r"[a-z][a-z_]*", label), where
            if vocabulary is Bound.fleet:
                assert label in FLEET_BOUNDED_LABELS, f"{where}: only ids of the fleet file"
            elif vocabulary is Bound.process:
                assert name.endswith("_info"), f"{where}: per-process values only on _info"
            else:
                assert isinstance(vocabulary, frozenset), where
                assert OTHER in vocabulary, f"{where}: needs the catch-all value"
                assert len(vocabulary) <= 64, where
                for value in vocabulary:
                    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", value), (where, value)


def test_code_labels_hold_every_error_code() -> None:
    assert {code.value for code in ErrorCode} <= metrics.CODES
    assert {code.value for code in ErrorCode} <= metrics.WAIT_REASONS


def test_emitted_label_values_stay_inside_their_declaration() -> None:
    registry = exercised()
    declarations = label_values_bounded()
    by_family = {spec.name.removesuffix("_total"): spec.name for spec in ALL_SPECS}
    seen_values: set[str] = set()
    for family in registry.collect():
        declared = declarations[by_family[family.name]]
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            assert set(labels) == set(declared), (sample.name, labels)
            for label, value in labels.items():
                vocabulary = declared[label]
                seen_values.add(value)
                if isinstance(vocabulary, frozenset):
                    assert value in vocabulary, (sample.name, label, value)
                elif vocabulary is Bound.fleet:
                    assert re.fullmatch(r"(?:[mg]:)?[A-Za-z0-9_.:@\-]{1,128}", value), value
    for junk in UNBOUNDED_VALUES:
        assert junk not in seen_values


def test_values_outside_a_vocabulary_fold_into_other() -> None:
    registry = exercised()
    dead = samples(registry, "rundispatch_dead_letters_total")
    assert dead[(("reason", "other"),)] == len(UNBOUNDED_VALUES)
    rejected = samples(registry, "rundispatch_runs_rejected_total")
    key = (("code", "other"), ("connection_kind", "other"), ("mode", "other"), ("target", "other"))
    assert rejected[key] == len(UNBOUNDED_VALUES)
    unknown = (("code", "ConnectionNotFound"), ("connection_kind", "none"), ("mode", "none"))
    assert rejected[(*unknown, ("target", "none"))] == 1


def test_metrics_module_imports_no_io_client() -> None:
    trees = [ast.parse(path.read_text()) for path in Path(metrics.__file__).parent.glob("*.py")]
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"aio_pika", "aiormq", "redis", "httpx", "msal"}


# ---- counters that alerts depend on -----------------------------------------------------------


def test_counters_behind_alerts_exist_at_zero_before_their_first_increment() -> None:
    # increase() cannot see a counter born at 1: the alerts need the 0 sample first.
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    reasons = {dict(k)["reason"] for k in samples(registry, "rundispatch_dead_letters_total")}
    assert reasons == metrics.DEAD_LETTER_REASONS - {OTHER}
    results = {dict(k)["result"] for k in samples(registry, "rundispatch_token_refreshes_total")}
    assert results == metrics.REFRESH_RESULTS - {OTHER}
    dispatcher.run_submitted("g:finance", "credentials", "unattended")
    assert list(samples(registry, "rundispatch_runs_timed_out_total").values()) == [0.0]


def test_timed_out_counts_as_completed_and_timed_out() -> None:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    dispatcher.run_submitted("g:finance", "credentials", "unattended")
    dispatcher.run_timed_out("g:finance", "credentials", "unattended")
    run = (("connection_kind", "credentials"), ("mode", "unattended"))
    assert samples(registry, "rundispatch_runs_timed_out_total") == {
        (*run, ("target", "g:finance")): 1
    }
    completed = samples(registry, "rundispatch_runs_completed_total")
    key = (("code", "NoCandidateMachine"), *run, ("status", "timed_out"), ("target", "g:finance"))
    assert completed == {key: 1}
    # A queue time-out has no run duration.
    assert samples(registry, "rundispatch_run_duration_seconds_count") == {}


# ---- queue state ------------------------------------------------------------------------------


def queue_series(
    registry: CollectorRegistry,
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    return {spec.name: samples(registry, spec.name) for spec in QUEUE_STATE_SPECS}


def test_queue_state_is_exported_from_the_snapshot() -> None:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    assert all(not series for series in queue_series(registry).values())
    dispatcher.set_queue_state(
        QueueStateSnapshot(
            now=1000.0,
            queues={("g:finance", "normal"): QueueStats(3, 940.0), ("g:hr", "high"): QueueStats(0)},
            waiting={("g:finance", "NoFreeSlot"): 2, ("g:finance", "MachineOffline"): 1},
            oldest_sign_in_enqueued_at={"m:m2": 1000.0 - 2800},
            machines={("finance", "online"): 2, ("finance", "maintenance"): 1},
            slots={"finance": SlotCounts(busy=2, free=1)},
        )
    )
    series = queue_series(registry)
    assert series["rundispatch_queued_runs"] == {
        (("priority", "normal"), ("target", "g:finance")): 3,
        (("priority", "high"), ("target", "g:hr")): 0,
    }
    # An empty queue has no oldest run.
    assert series["rundispatch_queue_oldest_age_seconds"] == {
        (("priority", "normal"), ("target", "g:finance")): 60.0
    }
    assert series["rundispatch_queue_oldest_sign_in_age_seconds"] == {(("target", "m:m2"),): 2800}
    assert series["rundispatch_queue_waiting_runs"] == {
        (("reason", "MachineOffline"), ("target", "g:finance")): 1,
        (("reason", "NoFreeSlot"), ("target", "g:finance")): 2,
    }
    assert series["rundispatch_machines"] == {
        (("group", "finance"), ("state", "maintenance")): 1,
        (("group", "finance"), ("state", "online")): 2,
    }
    assert series["rundispatch_unattended_slots"] == {
        (("group", "finance"), ("state", "busy")): 2,
        (("group", "finance"), ("state", "free")): 1,
    }
    assert series["rundispatch_queue_state_timestamp_seconds"] == {(): 1000.0}


def test_set_queue_state_clears_stale_series() -> None:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    dispatcher.set_queue_state(
        QueueStateSnapshot(
            now=100.0,
            queues={
                ("g:finance", "normal"): QueueStats(3, 40.0),
                ("g:hr", "normal"): QueueStats(1, 90),
            },
            waiting={("g:finance", "NoFreeSlot"): 3, ("g:hr", "MachineOffline"): 1},
            oldest_sign_in_enqueued_at={"g:finance": 50.0},
            machines={("finance", "online"): 2, ("hr", "offline"): 1},
            slots={"finance": SlotCounts(2, 0), "hr": SlotCounts(0, 0)},
        )
    )
    # g:finance drained and group hr was deleted.
    dispatcher.set_queue_state(
        QueueStateSnapshot(
            now=160.0,
            queues={("g:hr", "normal"): QueueStats(1, 90.0)},
            waiting={("g:hr", "MachineOffline"): 1},
            machines={("finance", "online"): 2},
            slots={"finance": SlotCounts(0, 2)},
        )
    )
    series = queue_series(registry)
    assert series["rundispatch_queued_runs"] == {(("priority", "normal"), ("target", "g:hr")): 1}
    assert series["rundispatch_queue_oldest_age_seconds"] == {
        (("priority", "normal"), ("target", "g:hr")): 70.0
    }
    assert series["rundispatch_queue_oldest_sign_in_age_seconds"] == {}
    assert series["rundispatch_queue_waiting_runs"] == {
        (("reason", "MachineOffline"), ("target", "g:hr")): 1
    }
    assert series["rundispatch_machines"] == {(("group", "finance"), ("state", "online")): 2}
    assert set(series["rundispatch_unattended_slots"]) == {
        (("group", "finance"), ("state", "busy")),
        (("group", "finance"), ("state", "free")),
    }
    dispatcher.set_queue_state(QueueStateSnapshot(now=200.0))
    series = queue_series(registry)
    assert series.pop("rundispatch_queue_state_timestamp_seconds") == {(): 200.0}
    assert all(not values for values in series.values())


def test_queue_state_folds_odd_keys_without_duplicates() -> None:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    dispatcher.set_queue_state(
        QueueStateSnapshot(
            now=100.0,
            queues={("g:a", "urgent"): QueueStats(2, 10.0), ("g:a", "later"): QueueStats(1, 0.0)},
            waiting={("g:a", "no idea"): 1, ("g:a", "run-123 failed"): 2},
            # A clock skew between replicas must not export a negative age.
            oldest_sign_in_enqueued_at={"g:a": 130.0},
        )
    )
    series = queue_series(registry)
    assert series["rundispatch_queued_runs"] == {(("priority", "other"), ("target", "g:a")): 3}
    assert series["rundispatch_queue_oldest_age_seconds"] == {
        (("priority", "other"), ("target", "g:a")): 100.0
    }
    assert series["rundispatch_queue_waiting_runs"] == {(("reason", "other"), ("target", "g:a")): 3}
    assert series["rundispatch_queue_oldest_sign_in_age_seconds"] == {(("target", "g:a"),): 0.0}


def test_a_scrape_sees_one_snapshot_or_the_next_never_a_mix() -> None:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)

    def snapshot(target: str) -> QueueStateSnapshot:
        return QueueStateSnapshot(
            now=1.0,
            queues={(f"g:{target}", "normal"): QueueStats(1, 0.0)},
            waiting={(f"g:{target}", "NoFreeSlot"): 1},
            oldest_sign_in_enqueued_at={f"g:{target}": 0.0},
            machines={(target, "online"): 1},
            slots={target: SlotCounts(1, 0)},
        )

    snapshots = [snapshot("a"), snapshot("b")]
    stop = threading.Event()

    def swap() -> None:
        i = 0
        while not stop.is_set():
            dispatcher.set_queue_state(snapshots[i % 2])
            i += 1

    dispatcher.set_queue_state(snapshots[0])
    swapper = threading.Thread(target=swap)
    swapper.start()
    try:
        for _ in range(300):
            values = set()
            for family in registry.collect():
                for sample in family.samples:
                    if "target" in sample.labels:
                        values.add(sample.labels["target"].removeprefix("g:"))
                    if "group" in sample.labels:
                        values.add(sample.labels["group"])
            assert values in ({"a"}, {"b"})
    finally:
        stop.set()
        swapper.join()
