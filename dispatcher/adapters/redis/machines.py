"""Live machine state in Redis (``MachineState``): heartbeats, what runs on each machine, offline
marks."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import decode_assigned, text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.models import (
    AssignedRun,
    FleetOccupancy,
    Heartbeat,
    LiveRecord,
    Machine,
    MachineView,
    Mode,
)
from dispatcher.names import Names
from dispatcher.usecases.results import BeatRecorded, HeartbeatOutcome, KeyRefused

log = logging.getLogger(__name__)

HEARTBEATS_SCRIPT = (resources.files("dispatcher.adapters") / "lua" / "heartbeats.lua").read_text()
ASSIGNED_SCRIPT = (resources.files("dispatcher.adapters") / "lua" / "assigned.lua").read_text()
# Machines per ``assigned.lua`` call: a script holds Redis while it runs, and a thousand
# machines (about a millisecond when idle) is what one heartbeat batch holds it for already.
ASSIGNED_CHUNK = 1000


def encode_live_record(heartbeat: Heartbeat) -> str:
    """The stored live record: compact JSON, the same bytes for the same facts (the script
    compares it with the stored one to skip the write)."""
    return LiveRecord.of(heartbeat).model_dump_json(exclude_defaults=True)


def decode_beat(raw: Sequence[Any]) -> HeartbeatOutcome:
    """One heartbeat's three replies of ``heartbeats.lua``."""
    code, was_offline, previous = text(raw[0]), bool(int(raw[1])), raw[2]
    if code == "k":
        return KeyRefused()
    return BeatRecorded(
        was_offline=was_offline,
        changed=code != "s",
        previous=LiveRecord.model_validate_json(previous) if code == "c" else None,
    )


@store_adapter
class RedisMachines:
    """Live machine state: heartbeats, slots, offline marks."""

    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        self._heartbeats = redis.register_script(HEARTBEATS_SCRIPT)
        self._assigned = redis.register_script(ASSIGNED_SCRIPT)

    async def record_heartbeats(
        self, heartbeats: Sequence[Heartbeat], received_at: float
    ) -> list[HeartbeatOutcome]:
        """Pin keys and record a batch of heartbeats in one script call (``heartbeats.lua``):
        a heartbeat whose live record did not change writes only its timestamp."""
        return await self._record(heartbeats, received_at, pin=True)

    async def record_heartbeat(self, heartbeat: Heartbeat, received_at: float) -> HeartbeatOutcome:
        """One heartbeat recorded without pinning its key (tools and the bench that write a
        machine's liveness directly)."""
        return (await self._record([heartbeat], received_at, pin=False))[0]

    async def _record(
        self, heartbeats: Sequence[Heartbeat], received_at: float, *, pin: bool
    ) -> list[HeartbeatOutcome]:
        if not heartbeats:
            return []
        names = self.names
        keys = [names.heartbeat_index, names.offline_machines, names.pinned_keys]
        keys += [names.key_mismatches, *(names.machine_live(h.machine_id) for h in heartbeats)]
        args: list[str] = [repr(received_at)]
        for heartbeat in heartbeats:
            key = heartbeat.public_key if pin and heartbeat.public_key else ""
            args += [heartbeat.machine_id, key, encode_live_record(heartbeat)]
        raw = await self._heartbeats(keys=keys, args=args)
        return [decode_beat(raw[i : i + 3]) for i in range(0, len(raw), 3)]

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
            record = LiveRecord.model_validate_json(live) if live else None
            online = last_seen is not None and now - float(last_seen) <= offline_after_s
            views.append(
                MachineView(
                    machine=machine,
                    online=online,
                    offline_since=None
                    if online or last_seen is None
                    else float(last_seen) + offline_after_s,
                    sessions=record.sessions if record else (),
                    assigned=tuple(decode_assigned(text(k), text(v)) for k, v in assigned.items()),
                    # Secrets are sealed only to the key pinned since the machine's registration.
                    has_public_key=pinned[index] is not None,
                    public_key=text(pinned[index]) if pinned[index] is not None else None,
                    key_mismatch=mismatches[index] is not None,
                )
            )
        return views

    async def occupancy(
        self, machines: Iterable[Machine], now: float, offline_after_s: float
    ) -> FleetOccupancy:
        """What the machine gauges count (online, the unattended runs assigned), for a whole
        fleet every few seconds: the heartbeat index in one read, then the runs of the online
        machines that have any (:meth:`assigned_to`). At 10,000 machines the full ``views``
        took more than half a core (bench/README.md, "live fleet")."""
        raw = await self.redis.zrangebyscore(
            self.names.heartbeat_index, now - offline_after_s, "+inf"
        )
        online = frozenset(text(m) for m in raw)
        asked = [m.machine_id for m in machines if m.machine_id in online and not m.maintenance]
        in_use = {
            machine_id: sum(1 for run in runs if run.mode is Mode.unattended)
            for machine_id, runs in (await self.assigned_to(asked)).items()
        }
        return FleetOccupancy(online=online, in_use=in_use)

    async def assigned_to(self, machine_ids: Sequence[str]) -> dict[str, list[AssignedRun]]:
        """The runs assigned to each of ``machine_ids`` that has any (``assigned.lua``, a
        thousand machines per call: an idle machine costs no reply)."""
        found: dict[str, list[AssignedRun]] = {}
        for first in range(0, len(machine_ids), ASSIGNED_CHUNK):
            chunk = machine_ids[first : first + ASSIGNED_CHUNK]
            raw = await self._assigned(keys=[self.names.machine_assigned(m) for m in chunk])
            at = 0
            while at < len(raw):
                machine_id, count = chunk[int(raw[at]) - 1], int(raw[at + 1])
                items = raw[at + 2 : at + 2 + 2 * count]
                found[machine_id] = [
                    decode_assigned(text(items[k]), text(items[k + 1]))
                    for k in range(0, len(items), 2)
                ]
                at += 2 + 2 * count
        return found

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

    async def placement_hold_s(
        self, now: float, heartbeat_interval_s: float, offline_after_s: float
    ) -> float:
        """The wait after a restart or failover of Redis (``MachineState.placement_hold_s``).

        Redis names each server process (``run_id`` in ``INFO server``): a restarted server or
        a promoted replica has a new one. The namespace keeps the one last seen and since when
        (``names.store_server``); the dispatcher that first sees another one records it, and
        every replica then holds placement until each machine online at that moment has
        heartbeated after the first interval since (its report has been reconciled: a lost
        claim is repaired from it). Nothing to compare with (a new namespace) is no restart.
        """
        key = self.names.store_server
        pipe = self.redis.pipeline(transaction=False)
        pipe.info("server")
        pipe.hmget(key, ["server", "since"])
        info, (known, since_raw) = await pipe.execute()
        server = str(info["run_id"])
        if known is None:
            await self.redis.hsetnx(key, "server", server)
            await self.redis.hsetnx(key, "since", "0")
            return 0.0
        since = float(since_raw or 0)
        if text(known) != server:
            since = now
            await self.redis.hset(key, mapping={"server": server, "since": repr(now)})
            log.warning(
                "Redis restarted or failed over (another server answers): placement waits until "
                "every online machine has reported what it runs (at most %.0f s), so that a "
                "claim Redis lost is repaired before its run could be placed again",
                offline_after_s + heartbeat_interval_s,
            )
        ends = since + offline_after_s + heartbeat_interval_s
        if now >= ends:
            return 0.0
        silent = await self.redis.zcount(
            self.names.heartbeat_index, now - offline_after_s, f"({since + heartbeat_interval_s!r}"
        )
        return min(heartbeat_interval_s, ends - now) if silent else 0.0
