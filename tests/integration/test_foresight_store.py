"""The foresight trace and outlooks in the real Redis: bounds, incremental reads, what the
metrics read, and what a terminal event becomes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from dispatcher.adapters.redis.connection import Redis, delete_namespace, make_redis
from dispatcher.adapters.redis.fleet import RedisFleet
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.adapters.redis.queue_state import RedisQueueState
from dispatcher.adapters.redis.traces import RedisTraces
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.metrics import DispatcherMetrics
from dispatcher.models import ConnectionKind, Mode, Priority, Run, RunStatus, SessionState
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.foresight import trace_of
from dispatcher.usecases.ports import TargetOutlook
from tests.support.processes import new_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def store() -> AsyncIterator[tuple[Settings, Redis, Names]]:
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    try:
        yield settings, redis, names
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()


def record(run_id: str, target: str = "g:finance", **changes: Any) -> TraceRecord:
    values: dict[str, Any] = {
        "run_id": run_id, "target": target, "connection_id": "c1",
        "kind": ConnectionKind.credentials, "mode": Mode.unattended,
        "priority": Priority.normal, "flow_id": "invoice", "queued_at": 1000.0,
        "queue_deadline": 1600.0, "status": RunStatus.succeeded, "dispatched_at": 1002.0,
        "started_at": 1002.5, "finished_at": 1010.0, "machine_id": "m1",
    }  # fmt: skip
    values.update(changes)
    return TraceRecord(**values)


async def test_records_read_back_in_order_and_incrementally(
    store: tuple[Settings, Redis, Names],
) -> None:
    _, redis, names = store
    traces = RedisTraces(redis, names, retention_s=3600, max_records=100)
    await traces.record([])  # nothing to keep: no round trip, no key
    assert await traces.traced_targets() == []
    # One batch (a batch of terminal events) to two targets.
    await traces.record(
        [
            record("r1"),
            record("r2", status=RunStatus.timed_out, dispatched_at=None),
            record("x1", target="m:m9"),
        ]
    )
    records, last = await traces.read("g:finance")
    assert [r.run_id for r in records] == ["r1", "r2"]
    assert records[1] == record("r2", status=RunStatus.timed_out, dispatched_at=None)
    assert await traces.read("g:finance", last) == ([], last)
    await traces.record([record("r3")])
    newer, _ = await traces.read("g:finance", last)
    assert [r.run_id for r in newer] == ["r3"]
    assert await traces.traced_targets() == ["g:finance", "m:m9"]


async def test_a_read_with_a_limit_reads_that_many_entries_then_goes_on_from_there(
    store: tuple[Settings, Redis, Names],
) -> None:
    _, redis, names = store
    traces = RedisTraces(redis, names, retention_s=3600, max_records=5000)
    await traces.record([record(f"r{i}") for i in range(2500)])  # more than one XRANGE chunk
    first, last = await traces.read("g:finance", limit=1200)
    assert [r.run_id for r in first] == [f"r{i}" for i in range(1200)]
    rest, end = await traces.read("g:finance", last, limit=2000)
    assert [r.run_id for r in rest] == [f"r{i}" for i in range(1200, 2500)]
    assert await traces.read("g:finance", end, limit=10) == ([], end)
    exact, _ = await traces.read("g:finance", limit=1000)  # a limit of exactly one chunk
    assert len(exact) == 1000


async def test_a_target_keeps_at_most_max_records_and_nothing_past_the_retention(
    store: tuple[Settings, Redis, Names],
) -> None:
    _, redis, names = store
    traces = RedisTraces(redis, names, retention_s=3600, max_records=100)
    # An entry written two hours ago (its stream id is its time): past the retention.
    old_ms = int((time.time() - 7200) * 1000)
    await redis.xadd(names.trace("g:finance"), {"j": json.dumps(record("old").to_dict())},
                     id=f"{old_ms}-0")  # fmt: skip
    await traces.record([record("r0")])
    assert [r.run_id for r in (await traces.read("g:finance"))[0]] == ["r0"]
    for index in range(1, 120):
        await traces.record([record(f"r{index}")])
    records, _ = await traces.read("g:finance")
    assert len(records) == 100
    assert [r.run_id for r in records] == [f"r{index}" for index in range(20, 120)]


async def test_an_entry_that_does_not_read_is_skipped(
    store: tuple[Settings, Redis, Names],
) -> None:
    _, redis, names = store
    traces = RedisTraces(redis, names, retention_s=3600, max_records=100)
    await traces.record([record("r1")])
    await redis.xadd(names.trace("g:finance"), {"j": '{"r": "broken"}'})
    await redis.xadd(names.trace("g:finance"), {"other": "x"})
    await traces.record([record("r2")])
    records, _ = await traces.read("g:finance")
    assert [r.run_id for r in records] == ["r1", "r2"]


async def test_outlooks_become_the_deadline_and_predicted_miss_gauges(
    store: tuple[Settings, Redis, Names],
) -> None:
    settings, redis, names = store
    traces = RedisTraces(redis, names, retention_s=3600, max_records=100)
    now = time.time()
    await traces.save_outlooks(
        {
            "g:finance": TargetOutlook(now, now + 600, 3),
            "m:m1": TargetOutlook(now, None, 0),
            "g:stale": TargetOutlook(now - 3600, now + 60, 9),  # a chore that stopped
        }
    )
    # The outlooks count for targets that still have queued runs only.
    await redis.sadd(names.targets, "g:finance", "m:m1", "g:stale")
    state = RedisQueueState(
        redis, names, RedisFleet(redis, names), RedisMachines(redis, names), traces=traces
    )
    snapshot = await state.snapshot(settings.offline_after_s)
    assert snapshot.predicted_timeouts == {"g:finance": 3, "m:m1": 0}
    assert snapshot.next_deadline_at == {"g:finance": pytest.approx(now + 600)}
    registry = CollectorRegistry()
    DispatcherMetrics(registry).set_queue_state(snapshot)
    left = registry.get_sample_value(
        "rundispatch_queue_next_deadline_seconds", {"target": "g:finance"}
    )
    assert left is not None and 590 < left <= 600
    assert (
        registry.get_sample_value("rundispatch_queue_predicted_timeouts", {"target": "g:finance"})
        == 3
    )
    assert (
        registry.get_sample_value("rundispatch_queue_predicted_timeouts", {"target": "g:stale"})
        is None
    )
    await traces.save_outlooks({})
    assert await traces.outlooks() == {}


async def test_machine_changes_read_back_in_order(store: tuple[Settings, Redis, Names]) -> None:
    _, redis, names = store
    traces = RedisTraces(redis, names, retention_s=3600, max_records=100)
    await traces.record_changes([])
    assert await traces.changes() == []
    online = MachineChange(10.0, "m1", True, sessions=(("CONTOSO\\alice", SessionState.active),))
    offline = MachineChange(20.0, "m1", False)
    await traces.record_changes([online])
    await redis.xadd(names.machine_changes, {"j": "not json"})
    await traces.record_changes([offline])
    assert await traces.changes() == [online, offline]


def test_a_terminal_event_becomes_a_trace_record_and_a_rejection_none() -> None:
    run = Run(
        run_id="r1", status=RunStatus.succeeded, flow_id="invoice", connection_id="c1",
        requested_by="alice@contoso.com", mode=Mode.unattended, target="g:finance",
        connection_kind=ConnectionKind.credentials, queued_at=1000.0, queue_deadline=1600.0,
        dispatched_at=1002.0, started_at=1002.5, finished_at=1010.0, machine_id="m1",
    )  # fmt: skip
    assert trace_of(run) == record("r1")
    rejected = run.model_copy(update={"status": RunStatus.rejected, "queued_at": None})
    assert trace_of(rejected) is None
