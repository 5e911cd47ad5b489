"""Recording heartbeats in batches (``MachineState.record_heartbeats``), on the real Redis and on
the fake: key pinning, what changed, offline marks, and the compact live record that a
heartbeat proving only that the machine is alive leaves untouched."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.adapters.redis import machines as machines_module
from dispatcher.adapters.redis.codec import encode_assigned
from dispatcher.adapters.redis.connection import delete_namespace, make_redis
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.models import (
    FinishedRef,
    Heartbeat,
    LiveRecord,
    Machine,
    RunningRef,
    Session,
    SessionState,
)
from dispatcher.names import Names
from dispatcher.usecases.ports import MachineState
from dispatcher.usecases.results import BeatRecorded, KeyRefused
from tests.integration.test_store_contract import Trace, open_store
from tests.support.processes import new_settings

pytestmark = pytest.mark.integration

KEY, OTHER_KEY = "key-of-m1", "another-key"
ALICE = Session(user="CONTOSO\\alice", state=SessionState.active)


def beat(
    machine_id: str = "m1", *sessions: Session, key: str | None = KEY, **fields: Any
) -> Heartbeat:
    fields.setdefault("sent_at", 1000.0)
    return Heartbeat(
        machine_id=machine_id, worker_id="w1", sessions=sessions, public_key=key, **fields
    )


async def heartbeat_scenario(machines: MachineState, seen: Trace) -> None:
    first = seen(await machines.record_heartbeats([beat()], 100.0))
    assert first == [BeatRecorded(was_offline=False, changed=True, previous=None)]
    # Only the timestamp, the running runs and the last outcomes differ: nothing changed.
    same = beat(
        sent_at=1005.0,
        running=(RunningRef(run_id="r1", fence=1),),
        finished=(FinishedRef(run_id="r0", fence=1, status="succeeded"),),
    )
    assert seen(await machines.record_heartbeats([same], 105.0)) == [
        BeatRecorded(was_offline=False, changed=False)
    ]
    signed_in = seen(await machines.record_heartbeats([beat("m1", ALICE)], 110.0))
    assert signed_in == [
        BeatRecorded(
            was_offline=False, changed=True, previous=LiveRecord(worker_id="w1", public_key=KEY)
        )
    ]
    # Another key: refused, nothing recorded (the sessions stay Alice's), the machine marked.
    assert seen(await machines.record_heartbeats([beat(key=OTHER_KEY)], 115.0)) == [KeyRefused()]
    assert await machines.mark_offline("m1", 120.0)
    back = seen(await machines.record_heartbeats([beat("m1", ALICE)], 130.0))
    assert back == [BeatRecorded(was_offline=True, changed=False)]
    # A batch: a new machine twice (the second sees the first), one without a key.
    batch = [beat("m2"), beat("m2"), beat("m3", key=None)]
    assert seen(await machines.record_heartbeats(batch, 140.0)) == [
        BeatRecorded(was_offline=False, changed=True),
        BeatRecorded(was_offline=False, changed=False),
        BeatRecorded(was_offline=False, changed=True),
    ]
    fleet = [Machine(machine_id=m, name=m) for m in ("m1", "m2", "m3")]
    views = {v.machine_id: v for v in await machines.views(fleet, 141.0, offline_after_s=15.0)}
    seen([v.model_dump(mode="json") for v in views.values()])
    assert views["m1"].sessions == (ALICE,) and views["m1"].key_mismatch
    assert views["m1"].public_key == KEY and views["m2"].public_key == KEY
    assert not views["m3"].has_public_key
    assert all(v.online for v in views.values())


@pytest.mark.parametrize("kind", ["redis", "fake"])
async def test_heartbeats_are_recorded_in_batches(kind: str) -> None:
    async with open_store(kind) as store:
        await heartbeat_scenario(store.machines, Trace())


async def test_the_fake_records_heartbeats_as_redis_does() -> None:
    traces = {}
    for kind in ("redis", "fake"):
        async with open_store(kind) as store:
            seen = Trace()
            await heartbeat_scenario(store.machines, seen)
            traces[kind] = seen.items
    assert traces["redis"] == traces["fake"]


async def test_the_live_record_is_compact_and_written_only_when_it_changes() -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    machines = RedisMachines(redis, names)
    try:
        await machines.record_heartbeats([beat()], 100.0)
        stored = await redis.get(names.machine_live("m1"))
        assert b"sent_at" not in stored and b"machine_id" not in stored
        # A record an earlier version stored (the whole heartbeat) reads, and is replaced.
        await redis.set(names.machine_live("m1"), beat("m1", ALICE).model_dump_json())
        view = (await machines.views([Machine(machine_id="m1", name="m1")], 100.0, 15.0))[0]
        assert view.sessions == (ALICE,)
        again = await machines.record_heartbeats([beat("m1", ALICE)], 101.0)
        assert again == [BeatRecorded(was_offline=False, changed=True, previous=view_record())]
        # A SET would drop the key's TTL: a TTL that survives proves the record was not written.
        live = names.machine_live("m1")
        await redis.expire(live, 1000)
        await machines.record_heartbeats([beat("m1", ALICE, sent_at=2000.0)], 200.0)
        assert await redis.ttl(live) > 0
        assert await redis.zscore(names.heartbeat_index, "m1") == 200.0
        await machines.record_heartbeats([beat("m1")], 210.0)  # Alice signed out
        assert await redis.ttl(live) == -1
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()


def view_record() -> LiveRecord:
    return LiveRecord(worker_id="w1", sessions=(ALICE,), public_key=KEY)


async def test_placement_waits_after_another_redis_server_answers() -> None:
    """A new namespace is no restart; another server (a restart, a failover: simulated by the
    server recorded being another one) holds placement until every machine online then has
    heartbeated after the first interval since, or has gone offline, and never longer than
    ``offline_after_s`` + ``heartbeat_interval_s``."""
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    machines = RedisMachines(redis, names)
    interval, offline = 1.0, 10.0
    try:
        await machines.record_heartbeats([beat("m1"), beat("m2"), beat("m3")], 90.0)
        assert await machines.placement_hold_s(100.0, interval, offline) == 0.0
        assert await machines.placement_hold_s(101.0, interval, offline) == 0.0
        await redis.hset(names.store_server, "server", "a-server-before-the-restart")
        # m3 went silent long ago: it is offline and is not waited for.
        await machines.record_heartbeats([beat("m1"), beat("m2")], 99.0)
        assert await machines.placement_hold_s(102.0, interval, offline) == interval
        assert float(await redis.hget(names.store_server, "since")) == 102.0
        # A heartbeat in the first interval after the restart may not be reconciled yet.
        await machines.record_heartbeats([beat("m1"), beat("m2")], 102.5)
        assert await machines.placement_hold_s(102.6, interval, offline) == interval
        await machines.record_heartbeats([beat("m1")], 103.5)
        assert await machines.placement_hold_s(103.6, interval, offline) == interval
        await machines.record_heartbeats([beat("m2")], 104.0)
        assert await machines.placement_hold_s(104.1, interval, offline) == 0.0
        # A machine that never reports again holds placement until it is offline, no longer.
        await machines.record_heartbeats([beat("m1"), beat("m2"), beat("m4")], 199.0)
        await redis.hset(names.store_server, "server", "another-one")
        assert await machines.placement_hold_s(200.0, interval, offline) == interval
        await machines.record_heartbeats([beat("m1"), beat("m2")], 201.5)
        assert await machines.placement_hold_s(205.0, interval, offline) == interval
        assert await machines.placement_hold_s(209.5, interval, offline) == 0.0  # m4 offline
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()


async def test_occupancy_counts_what_the_views_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine gauges' counts (the runs read a few machines per script call) agree with the
    full views, for online, offline and maintenance machines; the whole-fleet read returns the
    machines with runs only, each with the runs a read of that machine gives."""
    monkeypatch.setattr(machines_module, "ASSIGNED_CHUNK", 2)
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    machines = RedisMachines(redis, names)
    fleet = [Machine(machine_id=f"m{i}", name=f"m{i}", max_unattended_runs=3) for i in range(1, 7)]
    fleet.append(Machine(machine_id="m7", name="m7", maintenance=True))
    runs = {
        "m1": [("unattended", "alice"), ("unattended", "bob"), ("attended", "carol")],
        "m2": [("attended", "dave")],
        "m4": [("unattended", "erin")],
        "m5": [("unattended", "frank")],  # offline: not counted
        "m7": [("unattended", "grace")],  # in maintenance: not counted
    }
    try:
        online = [beat(m.machine_id) for m in fleet if m.machine_id != "m5"]
        await machines.record_heartbeats([beat("m5")], 50.0)
        await machines.record_heartbeats(online, 100.0)
        for machine_id, assigned in runs.items():
            for index, (mode, user) in enumerate(assigned):
                value = encode_assigned(mode, index + 1, user)
                await redis.hset(
                    names.machine_assigned(machine_id), f"{machine_id}-r{index}", value
                )
        counted = await machines.occupancy(fleet, 101.0, offline_after_s=15.0)
        ids = [m.machine_id for m in fleet]
        assert [(m, counted.is_online(m), counted.unattended_in_use(m)) for m in ids] == [
            ("m1", True, 2),
            ("m2", True, 0),
            ("m3", True, 0),
            ("m4", True, 1),
            ("m5", False, 0),
            ("m6", True, 0),
            ("m7", True, 0),
        ]
        views = await machines.views(fleet, 101.0, offline_after_s=15.0)
        for view in views:
            assert counted.is_online(view.machine.machine_id) == view.online
            if view.online and not view.machine.maintenance:
                assert counted.unattended_in_use(view.machine.machine_id) == view.unattended_in_use
        # The whole-fleet read: only the machines with runs, each with all of its runs.
        found = await machines.assigned_to(ids)
        assert sorted(found) == ["m1", "m2", "m4", "m5", "m7"]
        for machine_id, assigned_runs in found.items():
            assert assigned_runs == await machines.assigned(machine_id)
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()
