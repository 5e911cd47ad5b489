"""Queue and machine gauges derived from Redis (never from one replica's memory), so every
replica exports the same, right values."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from dispatcher.adapters.fleet_store import FleetStore
from dispatcher.adapters.machine_store import MachineStore
from dispatcher.adapters.redis_store import RunStore
from dispatcher.core.selection import slots_of
from dispatcher.metrics import QueueStateSnapshot, QueueStats, SlotCounts
from dispatcher.models import ConnectionKind, Mode

NO_GROUP = "none"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lane_reason(raw: Any) -> str:
    """One reason for a lane: the most common per-machine code (``Unplaced`` before any pass)."""
    if not raw:
        return "Unplaced"
    machines = json.loads(raw).get("machines") or {}
    codes = Counter(str(reason).split(" ", 1)[0] for reason in machines.values())
    return codes.most_common(1)[0][0] if codes else "Unplaced"


async def queue_state(
    runs: RunStore, fleet_store: FleetStore, machines: MachineStore, offline_after_s: float
) -> QueueStateSnapshot:
    """Read the queues (lane by lane: cost ~ lanes, not runs) and machines into a snapshot."""
    now = time.time()
    fleet = await fleet_store.load()
    names, redis = runs.names, runs.redis
    queues: dict[tuple[str, str], QueueStats] = {}
    waiting: Counter[tuple[str, str]] = Counter()
    sign_in_oldest: dict[str, float] = {}
    for target in await runs.targets():
        lanes = [_text(lane) for lane in await redis.zrange(names.lanes(target), 0, -1)]
        pipe = redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.zcard(names.lane(target, lane))
            pipe.zrange(names.lane(target, lane), 0, 0)
            pipe.hget(names.reasons(target), lane)
        raw = await pipe.execute()
        heads = [_text(raw[3 * i + 1][0]) if raw[3 * i + 1] else None for i in range(len(lanes))]
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
    all_machines = [fleet.machines[m] for m in sorted(fleet.machines)]
    for view in await machines.views(all_machines, now, offline_after_s):
        group = view.machine.group_id or NO_GROUP
        state = (
            "maintenance" if view.machine.maintenance else "online" if view.online else "offline"
        )
        machine_counts[(group, state)] += 1
        for other in ("online", "offline", "maintenance"):
            machine_counts[(group, other)] += 0
        if view.online and not view.machine.maintenance:
            used = min(view.unattended_in_use, slots_of(view))
            busy[group] += used
            free[group] += slots_of(view) - used
        else:
            busy[group] += 0
            free[group] += 0
    run_labels = frozenset(
        (connection.target.key, connection.kind.value, mode.value)
        for connection in fleet.connections.values()
        for mode in Mode
        # Admission rejects unattended sign-in runs: they never queue, so never time out.
        if not (connection.kind is ConnectionKind.sign_in and mode is Mode.unattended)
    )
    return QueueStateSnapshot(
        now=now,
        queues=queues,
        waiting=dict(waiting),
        oldest_sign_in_enqueued_at=sign_in_oldest,
        machines=dict(machine_counts),
        slots={group: SlotCounts(busy[group], free[group]) for group in busy},
        run_labels=run_labels,
    )
