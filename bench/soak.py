"""``make soak MINUTES=30``: a mixed load with faults on a timer, for memory that stays flat.

Two dispatchers and three workers (simulated flows) in a private namespace; a steady load of
short, long, failing and cancelled runs; every ``FAULT_EVERY_S`` one fault in turn: a
dispatcher SIGKILLed (and restarted), a worker SIGKILLed (and restarted), a machine queue
deleted under its worker. The retention is short (``RETENTION_S``) so that it applies within
the soak: finished runs expire, their indexes are trimmed.

It reports, after warm-up (one retention) and at the end: the namespace's memory in Redis
(``MEMORY USAGE`` of every key of the namespace, and the server's ``used_memory``, which
other users of a shared Redis move too), the dispatchers' and workers' RSS, and the key counts
by kind. Writes ``bench/results/soak-latest.json``.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis

from bench.env import REPO, Procs, cleanup, new_settings, settings_env
from bench.procfs import proc_rss
from dispatcher.client import Client
from dispatcher.names import Names
from dispatcher.settings import Settings

RETENTION_S = 120.0
RATE = 12.0  # runs per second (the second argument)
FAULT_EVERY_S = 45.0
MACHINES = ("s1", "s2", "s3")
DISPATCHERS = ("d1", "d2")
OWNER = "alice@contoso.com"


def fleet(path: Path) -> Path:
    document = {
        "environment": {"tenant_id": "0f8fad5b-d9cb-469f-a165-70867728950e"},
        "groups": [{"group_id": "soak", "name": "Soak"}],
        "machines": [
            {"machine_id": m, "name": m.upper(), "group_id": "soak", "os": "windows_server",
             "max_unattended_runs": 8}
            for m in MACHINES
        ],
        "connections": [
            {"connection_id": "c1", "owner": OWNER, "kind": "credentials",
             "target": {"group_id": "soak"}, "username": "CONTOSO\\svc", "password": "pw"}
        ],
    }  # fmt: skip
    path.write_text(json.dumps(document))
    return path


async def redis_view(settings: Settings) -> dict[str, Any]:
    """The namespace's keys by kind and their memory, and the server's used memory."""
    names = Names(settings.namespace)
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    kinds: Counter[str] = Counter()
    memory = 0
    queued = 0
    try:
        async for key in redis.scan_iter(match=names.pattern(), count=2000):
            kind = key.decode().split(":")[1]
            kinds[kind] += 1
            memory += int(await redis.memory_usage(key) or 0)
            if kind == "q":
                queued += int(await redis.zcard(key))
        info = await redis.info("memory")
    finally:
        await redis.aclose()
    return {
        "namespace_bytes": memory,
        "server_used_memory": int(info["used_memory"]),
        "keys": dict(sorted(kinds.items())),
        "key_count": sum(kinds.values()),
        "queued_runs": queued,
    }


def rss(procs: Procs) -> dict[str, int]:
    return {name: proc_rss(p.pid)[0] for name, p in procs.procs.items() if p.poll() is None}


async def snapshot(settings: Settings, procs: Procs, at_s: float) -> dict[str, Any]:
    view = await redis_view(settings)
    sizes = rss(procs)
    return {
        "at_s": round(at_s, 1),
        **view,
        "rss": sizes,
        "dispatcher_rss": sum(v for k, v in sizes.items() if k.startswith("d")),
        "worker_rss": sum(v for k, v in sizes.items() if k.startswith("worker-")),
    }


async def load(client: Client, stop_at: float, stats: Counter[str], rate: float) -> None:
    rng = random.Random(7)
    began = time.monotonic()
    index = 0
    recent: list[str] = []
    while time.monotonic() < stop_at:
        delay = began + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        index += 1
        roll = rng.random()
        inputs: dict[str, Any] = {"duration_s": round(rng.uniform(0, 0.1), 3)}
        if roll < 0.05:
            inputs = {"duration_s": 3.0}
        elif roll < 0.15:
            inputs["outcome"] = "failed"
        try:
            run_id = await client.submit(
                connection_id="c1", flow_id="soak", requested_by=OWNER, mode="unattended",
                inputs=inputs, run_id=f"soak-{index}-{uuid.uuid4().hex[:6]}",
            )  # fmt: skip
            stats["submitted"] += 1
            recent.append(run_id)
            if roll > 0.97 and len(recent) > 20:
                # A run submitted a second ago: queued, dispatched, running or ended by now.
                await client.cancel(recent[-20], "soak cancel")
                stats["cancelled"] += 1
        except Exception as exc:
            stats[f"error {type(exc).__name__}"] += 1
            await asyncio.sleep(0.5)


async def faults(procs: Procs, settings: Settings, stop_at: float, log: list[str]) -> None:
    turn = 0
    began = time.monotonic()
    while time.monotonic() + FAULT_EVERY_S < stop_at:
        await asyncio.sleep(FAULT_EVERY_S)
        kind = turn % 3
        turn += 1
        at = f"{time.monotonic() - began:6.0f}s"
        if kind == 0:
            name = DISPATCHERS[turn % len(DISPATCHERS)]
            procs.stop(name, timeout=0.1)
            start_dispatcher(procs, name)
            log.append(f"{at} killed and restarted {name}")
        elif kind == 1:
            machine = MACHINES[turn % len(MACHINES)]
            procs.stop(f"worker-{machine}", timeout=0.1)
            start_worker(procs, machine)
            log.append(f"{at} killed and restarted worker {machine}")
        else:
            machine = MACHINES[turn % len(MACHINES)]
            connection = await aio_pika.connect(settings.amqp_url.get_secret_value().split(",")[0])
            async with connection:
                channel = await connection.channel()
                await channel.queue_delete(Names(settings.namespace).machine_queue(machine))
            log.append(f"{at} deleted the queue of {machine}")


def apply_fleet(procs: Procs) -> None:
    command = [sys.executable, "-m", "dispatcher", "apply", str(fleet(procs.workdir / "f.json"))]
    subprocess.run(command, env=procs.env, cwd=REPO, check=True, capture_output=True, timeout=60)


def start_dispatcher(procs: Procs, name: str) -> None:
    procs.start(name, ["-m", "dispatcher", "serve", "--metrics-port", "0"])


def start_worker(procs: Procs, machine: str) -> None:
    state = procs.workdir / f"state-{machine}"
    procs.start(
        f"worker-{machine}",
        [
            "-m",
            "workers",
            "serve",
            "--machine-id",
            machine,
            "--executor",
            "simulate",
            "--state-dir",
            str(state),
        ],
    )


async def soak(minutes: float, rate: float = RATE) -> dict[str, Any]:
    # Assignments lost with a deleted machine queue hold their slots until the start timeout.
    settings = new_settings(retention_s=RETENTION_S, heartbeat_interval_s=1.0, start_timeout_s=20.0)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    procs = Procs(workdir, settings_env(settings))
    stats: Counter[str] = Counter()
    faults_log: list[str] = []
    began = time.monotonic()
    stop_at = began + minutes * 60
    try:
        await asyncio.to_thread(apply_fleet, procs)
        for name in DISPATCHERS:
            start_dispatcher(procs, name)
        for machine in MACHINES:
            start_worker(procs, machine)
        async with Client.connect(settings) as client:
            start = await snapshot(settings, procs, 0.0)
            running = asyncio.gather(
                load(client, stop_at, stats, rate), faults(procs, settings, stop_at, faults_log)
            )
            warm_up_s = min(RETENTION_S + 60, minutes * 60 / 2)
            await asyncio.sleep(warm_up_s)
            warm = await snapshot(settings, procs, time.monotonic() - began)
            await running
            await asyncio.sleep(10)  # let the last runs end
            end = await snapshot(settings, procs, time.monotonic() - began)
    finally:
        procs.stop_all()
        await cleanup(
            settings, queues=[Names(settings.namespace).machine_queue(m) for m in MACHINES]
        )

    def change(key: str) -> float:
        return round((end[key] - warm[key]) / max(1, warm[key]) * 100, 1)

    result = {
        "minutes": minutes,
        "retention_s": RETENTION_S,
        "rate_per_s": rate,
        "load": dict(stats),
        "faults": faults_log,
        "start": start,
        "after_warm_up": warm,
        "end": end,
        "change_after_warm_up_pct": {
            key: change(key)
            for key in ("namespace_bytes", "key_count", "dispatcher_rss", "worker_rss")
        },
    }
    out = REPO / "bench" / "results" / "soak-latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    minutes = float(args[0]) if args and args[0] else 30.0
    rate = float(args[1]) if len(args) > 1 else RATE
    result = asyncio.run(soak(minutes, rate))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
