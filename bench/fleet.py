"""The bench's fleet: live machines with workers, machines that only exist (heartbeats written
by the bench), and runs that wait (inserted through the admit script, pipelined).

Fleet of ``total`` machines:

* group ``live``: the machines with a simulated worker each (windows_server, 10 unattended
  slots); connections ``c-live-0`` .. ``c-live-9`` (credentials, one user each) target it:
  the measured runs. One user per slot: an unattended run occupies a session of its user, so
  runs of a single connection could use only one slot per machine;
* machine ``wait-att``: online (heartbeat written by the bench), no session; connection
  ``c-att`` runs attended there, so its runs wait for a session (AttendedUserNotLoggedIn);
* group ``off``: machine ``wait-off``, never seen; connection ``c-off`` runs unattended there,
  so its runs wait (MachineOffline);
* groups ``idle00``..: the rest, ≤ 50 machines per group, online, no connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import Calls
from dispatcher.adapters.redis.machines import RedisMachines
from dispatcher.adapters.redis.scripts import ScriptRunner
from dispatcher.core.deadlines import queue_deadline
from dispatcher.core.ordering import order_score
from dispatcher.models import ConnectionKind, Heartbeat, Mode, RunRequest
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.ports import Admission

TENANT = "11111111-2222-3333-4444-555555555555"
OWNER = "bench@contoso.com"
LIVE_SLOTS = 10
# One connection (one user) per unattended slot of a live machine: the measured runs are spread
# over them round robin, so every slot of every live machine can be busy.
LIVE_CONNECTIONS = tuple(f"c-live-{i}" for i in range(LIVE_SLOTS))
GROUP_SIZE = 50
STATIC_WORKER = "bench-static"
STATIC_KEY = "bench-static-public-key"


def live_ids(count: int) -> list[str]:
    return [f"live-{i}" for i in range(1, count + 1)]


def idle_ids(live: int, total: int) -> list[str]:
    """Machines that only exist: every machine but the live ones and ``wait-off``."""
    return ["wait-att", *(f"idle-{i:04d}" for i in range(total - live - 2))]


def fleet_document(live: Sequence[str], total: int) -> dict[str, Any]:
    if total < len(live) + 2:
        raise ValueError("the fleet needs room for the live machines, wait-att and wait-off")
    groups = [{"group_id": "live", "name": "Bench live"}, {"group_id": "off", "name": "Offline"}]
    machines: list[dict[str, Any]] = [
        {
            "machine_id": machine_id,
            "name": machine_id,
            "group_id": "live",
            "os": "windows_server",
            "max_unattended_runs": LIVE_SLOTS,
        }
        for machine_id in live
    ]
    machines.append({"machine_id": "wait-att", "name": "wait-att"})
    machines.append({"machine_id": "wait-off", "name": "wait-off", "group_id": "off"})
    for index, machine_id in enumerate(idle_ids(len(live), total)[1:]):
        group = f"idle{index // GROUP_SIZE:02d}"
        if index % GROUP_SIZE == 0:
            groups.append({"group_id": group, "name": group})
        machines.append({"machine_id": machine_id, "name": machine_id, "group_id": group})
    connections = [
        {
            "connection_id": connection_id,
            "owner": OWNER,
            "kind": "credentials",
            "target": {"group_id": "live"},
            "username": f"CONTOSO\\svc-bench-{index}",
            "password": "bench-password",
        }
        for index, connection_id in enumerate(LIVE_CONNECTIONS)
    ]
    connections += [
        {
            "connection_id": "c-att",
            "owner": OWNER,
            "kind": "credentials",
            "target": {"machine_id": "wait-att"},
            "username": "CONTOSO\\nobody",
            "password": "bench-password",
        },
        {
            "connection_id": "c-off",
            "owner": OWNER,
            "kind": "credentials",
            "target": {"group_id": "off"},
            "username": "CONTOSO\\svc-off",
            "password": "bench-password",
        },
    ]
    return {
        "environment": {"tenant_id": TENANT},
        "groups": groups,
        "machines": machines,
        "connections": connections,
    }


def static_heartbeat(machine_id: str) -> Heartbeat:
    return Heartbeat(
        machine_id=machine_id,
        worker_id=STATIC_WORKER,
        sent_at=time.time(),
        sessions=(),
        public_key=STATIC_KEY,
    )


async def record_heartbeats(machines: RedisMachines, machine_ids: Sequence[str]) -> None:
    """Heartbeats written straight into Redis (``RedisMachines.record_heartbeat``)."""
    now = time.time()
    for start in range(0, len(machine_ids), 100):
        await asyncio.gather(
            *(
                machines.record_heartbeat(static_heartbeat(m), now)
                for m in machine_ids[start : start + 100]
            )
        )


async def forget_machines(redis: aioredis.Redis, names: Names, machine_ids: Sequence[str]) -> None:
    """Remove what the bench wrote for machines that left the fleet (live state, index)."""
    for start in range(0, len(machine_ids), 500):
        chunk = machine_ids[start : start + 500]
        pipe = redis.pipeline(transaction=False)
        pipe.zrem(names.heartbeat_index, *chunk)
        pipe.hdel(names.offline_machines, *chunk)
        pipe.unlink(*(names.machine_live(m) for m in chunk))
        await pipe.execute()


# ---- waiting runs ---------------------------------------------------------------------------
def credentials_admission(
    request: RunRequest, target: str, at: float, settings: Settings
) -> Admission:
    """The admission of a credentials run queued on ``target`` at ``at``, as intake makes it
    (the bench fills queues straight through ``admit.lua``)."""
    return Admission(
        request=request,
        target=target,
        connection_kind=ConnectionKind.credentials,
        score=order_score(request.priority, at, settings.priority_boost_s),
        deadline=queue_deadline(
            enqueued_at=at,
            kind=ConnectionKind.credentials,
            requested_timeout_s=None,
            default_timeout_s=settings.queue_timeout_s,
            sign_in_timeout_s=settings.sign_in_queue_timeout_s,
        ),
        throttle_limit=settings.throttle_per_minute,
        queue_cap=settings.queue_cap,
        now=at,
    )


async def insert_waiting(
    redis: aioredis.Redis, settings: Settings, count: int, start: int = 0, chunk: int = 2000
) -> float:
    """Queue ``count`` runs that wait: alternately attended on ``wait-att`` (no session) and
    unattended on group ``off`` (offline), with exactly the keys and arguments the dispatcher's
    admission uses (``Calls.admit``), thousands per round trip. Their run.queued outbox entries
    are deleted, as the dispatcher does after publishing them (nobody subscribes to them
    here). Returns seconds."""
    names = Names(settings.namespace)
    calls = Calls(names, settings.retention_s)
    scripts = ScriptRunner(redis)
    await redis.script_load(scripts.scripts["admit"].script)
    began = time.perf_counter()
    now = time.time()
    for first in range(start, start + count, chunk):
        pipe = redis.pipeline(transaction=False)
        for i in range(first, min(start + count, first + chunk)):
            attended = i % 2 == 0
            request = RunRequest(
                run_id=f"wait-{i}",
                flow_id="bench-wait",
                connection_id="c-att" if attended else "c-off",
                requested_by=OWNER,
                mode=Mode.attended if attended else Mode.unattended,
                inputs={"duration_s": 0},
            )
            at = now + i * 1e-6
            target = "m:wait-att" if attended else "g:off"
            keys, args = calls.admit(credentials_admission(request, target, at, settings))
            pipe.evalsha(scripts.sha("admit"), len(keys), *keys, *args)
        results = await pipe.execute()
        outbox_ids = []
        for result in results:
            if result[0] not in (b"queued", "queued"):
                raise RuntimeError(f"a waiting run was not queued: {result[:2]!r}")
            outbox_ids.append(result[1][0])
        await redis.xdel(names.outbox, *outbox_ids)
    return time.perf_counter() - began


async def queued_run_bytes(
    redis: aioredis.Redis, settings: Settings, queued: int, samples: int = 200
) -> dict[str, Any]:
    """Redis bytes per queued run: MEMORY USAGE of a run's hash (mean over ``samples`` waiting
    runs) plus its share of every index that holds it (target queue, lane, queue deadlines)."""
    names = Names(settings.namespace)
    step = max(1, queued // samples)
    pipe = redis.pipeline(transaction=False)
    for i in range(0, queued, step):
        pipe.memory_usage(names.run(f"wait-{i}"), samples=0)
    hashes = [h for h in await pipe.execute() if h]
    lanes = {
        "m:wait-att": "c-att|attended|normal",
        "g:off": "c-off|unattended|normal",
    }
    indexes: dict[str, int] = {}
    for target, lane in lanes.items():
        for key in (names.queue(target), names.lane(target, lane)):
            indexes[key] = int(await redis.memory_usage(key, samples=0) or 0)
    indexes[names.queue_deadlines] = int(
        await redis.memory_usage(names.queue_deadlines, samples=0) or 0
    )
    hash_mean = sum(hashes) / len(hashes)
    index_share = sum(indexes.values()) / queued
    encoding = await redis.object("encoding", names.run("wait-0"))
    return {
        "hash_bytes_mean": round(hash_mean, 1),
        "index_bytes_per_run": round(index_share, 1),
        "bytes_per_queued_run": round(hash_mean + index_share),
        "hash_encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
        "sampled_hashes": len(hashes),
        "index_keys": indexes,
    }
