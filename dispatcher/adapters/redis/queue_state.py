"""Queue and machine gauges derived from Redis (never from one replica's memory), so every
replica exports the same, right values."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.adapters.redis.fleet import RedisFleet
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.adapters.redis.traces import RedisTraces
from dispatcher.core.selection import machine_slots
from dispatcher.metrics import QueueStateSnapshot, QueueStats, SlotCounts
from dispatcher.models import ConnectionKind, Mode
from dispatcher.names import Names

NO_GROUP = "none"


def lane_reason(raw: Any) -> str:
    """One reason for a lane: the most common per-machine code (``Unplaced`` before any pass)."""
    if not raw:
        return "Unplaced"
    machines = json.loads(raw).get("machines") or {}
    codes = Counter(str(reason).split(" ", 1)[0] for reason in machines.values())
    return codes.most_common(1)[0][0] if codes else "Unplaced"


@store_adapter
class RedisQueueState:
    """Reads the queue and machine gauges of the whole namespace."""

    def __init__(
        self,
        redis: aioredis.Redis,
        names: Names,
        fleet: RedisFleet,
        machines: RedisMachines,
        *,
        traces: RedisTraces | None = None,
        outlook_max_age_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.names = names
        self.fleet = fleet
        self.machines = machines
        self.traces = traces
        self.outlook_max_age_s = outlook_max_age_s

    async def snapshot(self, offline_after_s: float) -> QueueStateSnapshot:
        """Read the queues (lane by lane: cost ~ lanes, not runs) and machines."""
        return await queue_state(self, offline_after_s)

    async def outbox_length(self) -> int:
        """Entries recorded in the outbox and not published yet."""
        return int(await self.redis.xlen(self.names.outbox))


async def queue_state(source: RedisQueueState, offline_after_s: float) -> QueueStateSnapshot:
    """Read the queues (lane by lane: cost ~ lanes, not runs) and machines into a snapshot."""
    now = time.time()
    fleet = await source.fleet.load()
    names, redis, machines = source.names, source.redis, source.machines
    queues: dict[tuple[str, str], QueueStats] = {}
    waiting: Counter[tuple[str, str]] = Counter()
    sign_in_oldest: dict[str, float] = {}
    targets = sorted(text(t) for t in await redis.smembers(names.targets))
    for target in targets:
        lanes = [text(lane) for lane in await redis.zrange(names.lanes(target), 0, -1)]
        pipe = redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.zcard(names.lane(target, lane))
            pipe.zrange(names.lane(target, lane), 0, 0)
            pipe.hget(names.reasons(target), lane)
        raw = await pipe.execute()
        heads = [text(raw[3 * i + 1][0]) if raw[3 * i + 1] else None for i in range(len(lanes))]
        pipe = redis.pipeline(transaction=False)
        for head in heads:
            pipe.hget(names.run(head or "-"), "queued_at")
        queued_at = await pipe.execute()
        depth: Counter[str] = Counter()
        oldest: dict[str, float] = {}
        for index, lane in enumerate(lanes):
            connection_id, _, priority = lane.split("|", 2)
            size = int(raw[3 * index])
            depth[priority] += size
            waiting[(target, lane_reason(raw[3 * index + 2]))] += size
            if queued_at[index] is None:
                continue
            since = float(queued_at[index])
            oldest[priority] = min(oldest.get(priority, since), since)
            connection = fleet.connections.get(connection_id)
            if connection is not None and connection.kind is ConnectionKind.sign_in:
                sign_in_oldest[target] = min(sign_in_oldest.get(target, since), since)
        for priority in ("high", "normal"):
            queues[(target, priority)] = QueueStats(depth[priority], oldest.get(priority))
    machine_counts: Counter[tuple[str, str]] = Counter()
    busy: Counter[str] = Counter()
    free: Counter[str] = Counter()
    fleet_machines = fleet.machines.values()
    occupancy = await machines.occupancy(fleet_machines, now, offline_after_s)
    for machine in fleet_machines:
        group = machine.group_id or NO_GROUP
        if machine.maintenance:
            machine_counts[(group, "maintenance")] += 1
        elif not occupancy.is_online(machine.machine_id):
            machine_counts[(group, "offline")] += 1
        else:
            machine_counts[(group, "online")] += 1
            slots = machine_slots(machine)
            used = min(occupancy.unattended_in_use(machine.machine_id), slots)
            busy[group] += used
            free[group] += slots - used
    # Every group has all its series, at 0 where nothing counts.
    for group in {group for group, _ in machine_counts}:
        for state in ("online", "offline", "maintenance"):
            machine_counts[(group, state)] += 0
        busy[group] += 0
        free[group] += 0
    run_labels = frozenset(
        (connection.target.key, connection.kind.value, mode.value)
        for connection in fleet.connections.values()
        for mode in Mode
        # Admission rejects unattended sign-in runs: they never queue, so never time out.
        if not (connection.kind is ConnectionKind.sign_in and mode is Mode.unattended)
    )
    outlooks = await source.traces.outlooks() if source.traces is not None else {}
    # An outlook older than this is a forecast chore that stopped: better no value than a stale one.
    fresh = {
        target: outlook
        for target, outlook in outlooks.items()
        if now - outlook.at <= source.outlook_max_age_s and target in targets
    }
    return QueueStateSnapshot(
        now=now,
        next_deadline_at={
            t: o.next_deadline_at for t, o in fresh.items() if o.next_deadline_at is not None
        },
        predicted_timeouts={t: o.predicted_timeouts for t, o in fresh.items()},
        queues=queues,
        waiting=dict(waiting),
        oldest_sign_in_enqueued_at=sign_in_oldest,
        machines=dict(machine_counts),
        slots={group: SlotCounts(busy[group], free[group]) for group in busy},
        run_labels=run_labels,
    )
