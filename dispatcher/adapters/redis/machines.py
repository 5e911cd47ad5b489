"""Live machine state in Redis (``MachineState``): heartbeats, what runs on each machine, offline
marks."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import decode_assigned, text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.models import AssignedRun, Heartbeat, Machine, MachineView
from dispatcher.names import Names


@store_adapter
class RedisMachines:
    """Live machine state: heartbeats, slots, offline marks."""

    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    async def record_heartbeat(
        self, heartbeat: Heartbeat, received_at: float
    ) -> tuple[Heartbeat | None, bool]:
        """Store a heartbeat; return the previous one and whether the machine was offline."""
        names = self.names
        pipe = self.redis.pipeline(transaction=False)
        pipe.getset(names.machine_live(heartbeat.machine_id), heartbeat.model_dump_json())
        pipe.zadd(names.heartbeat_index, {heartbeat.machine_id: received_at})
        pipe.hdel(names.offline_machines, heartbeat.machine_id)
        previous, _, was_offline = await pipe.execute()
        return (Heartbeat.model_validate_json(previous) if previous else None), bool(was_offline)

    async def pin_key(self, machine_id: str, public_key: str, now: float) -> bool:
        """Pin the key at the first heartbeat since registration; refuse another one."""
        names = self.names
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(names.pinned_keys, machine_id, public_key)
        pipe.hget(names.pinned_keys, machine_id)
        _, pinned = await pipe.execute()
        if text(pinned) == public_key:
            return True
        await self.redis.hset(names.key_mismatches, machine_id, repr(now))
        return False

    async def forget_key(self, machine_id: str) -> None:
        """Drop the pinned key and the mismatch mark (the machine is registered again)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.names.pinned_keys, machine_id)
        pipe.hdel(self.names.key_mismatches, machine_id)
        await pipe.execute()

    async def views(
        self, machines: Sequence[Machine], now: float, offline_after_s: float
    ) -> list[MachineView]:
        """What selection needs about each machine, read in one round trip."""
        if not machines:
            return []
        names = self.names
        pipe = self.redis.pipeline(transaction=False)
        for machine in machines:
            pipe.zscore(names.heartbeat_index, machine.machine_id)
            pipe.get(names.machine_live(machine.machine_id))
            pipe.hgetall(names.machine_assigned(machine.machine_id))
        ids = [m.machine_id for m in machines]
        pipe.hmget(names.key_mismatches, ids)
        pipe.hmget(names.pinned_keys, ids)
        *raw, mismatches, pinned = await pipe.execute()
        views = []
        for index, machine in enumerate(machines):
            last_seen, live, assigned = raw[3 * index : 3 * index + 3]
            heartbeat = Heartbeat.model_validate_json(live) if live else None
            online = last_seen is not None and now - float(last_seen) <= offline_after_s
            views.append(
                MachineView(
                    machine=machine,
                    online=online,
                    offline_since=None
                    if online or last_seen is None
                    else float(last_seen) + offline_after_s,
                    sessions=heartbeat.sessions if heartbeat else (),
                    assigned=tuple(decode_assigned(text(k), text(v)) for k, v in assigned.items()),
                    # Secrets are sealed only to the key pinned since the machine's registration.
                    has_public_key=pinned[index] is not None,
                    public_key=text(pinned[index]) if pinned[index] is not None else None,
                    key_mismatch=mismatches[index] is not None,
                )
            )
        return views

    async def stale(self, now: float, offline_after_s: float) -> list[str]:
        """Machines whose last heartbeat is older than ``offline_after_s``."""
        rows = await self.redis.zrangebyscore(
            self.names.heartbeat_index, "-inf", now - offline_after_s
        )
        return [text(r) for r in rows]

    async def offline_marks(self) -> dict[str, float]:
        raw = await self.redis.hgetall(self.names.offline_machines)
        return {text(k): float(v) for k, v in raw.items()}

    async def mark_offline(self, machine_id: str, since: float) -> bool:
        """True the first time a machine is marked offline (one replica wins)."""
        return bool(await self.redis.hsetnx(self.names.offline_machines, machine_id, since))

    async def assigned(self, machine_id: str) -> list[AssignedRun]:
        raw = await self.redis.hgetall(self.names.machine_assigned(machine_id))
        return [decode_assigned(text(k), text(v)) for k, v in raw.items()]
