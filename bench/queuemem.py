"""RabbitMQ memory per machine queue: ``count`` queues of one type declared (as the product
declares a machine's queue: durable, dead-lettering to the namespace's dead exchange, a
delivery limit for quorum), the node's memory read before and after through the management
API (``/api/nodes/<node>/memory``: the same breakdown as ``rabbitmq-diagnostics
memory_breakdown``), then every queue deleted. Queues are named ``<ns>.qmem.<type>.<i>``.

``python -m bench.queuemem --count 10000`` measures both types; the ``fleet`` section of the
bench reuses :func:`measure_queue_memory`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import aiormq
import httpx

from bench.env import new_settings
from bench.procfs import cores, pid_listening_on, sample
from dispatcher.adapters.amqp.identities import vhost_of
from dispatcher.core.principals import DELIVERY_LIMIT, REPLIES_ARGUMENTS
from dispatcher.names import Names
from dispatcher.settings import Settings

# How many declarations are in flight at once on the channel.
WINDOW = 50
# RabbitMQ's CPU with the queues declared and nothing happening (quorum queues tick).
IDLE_WINDOW_S = 10.0


def arguments(queue_type: str, names: Names) -> dict[str, Any]:
    if queue_type == "quorum":
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": names.dead_exchange,
        }
    if queue_type == "classic-replies":
        return dict(REPLIES_ARGUMENTS)
    return {"x-queue-type": "classic", "x-dead-letter-exchange": names.dead_exchange}


class NodeMemory:
    """The broker node's memory breakdown, through the management API."""

    def __init__(self, admin_url: str) -> None:
        parts = httpx.URL(admin_url)
        self.client = httpx.AsyncClient(
            base_url=f"{parts.scheme}://{parts.host}:{parts.port or 15672}",
            auth=(parts.username or "guest", parts.password or "guest"),
            timeout=30.0,
        )

    async def node(self) -> str:
        response = await self.client.get("/api/overview")
        response.raise_for_status()
        return str(response.json()["node"])

    async def breakdown(self) -> dict[str, Any]:
        node = await self.node()
        response = await self.client.get(f"/api/nodes/{quote(node, safe='')}/memory")
        response.raise_for_status()
        memory = response.json()["memory"]
        return {
            "rss": int(memory["total"]["rss"]),
            "erlang": int(memory["total"]["erlang"]),
            "queue_procs": int(memory["queue_procs"]),
            "quorum_queue_procs": int(memory["quorum_queue_procs"]),
            "quorum_ets": int(memory["quorum_ets"]),
            "mnesia": int(memory["mnesia"]),
            "other_ets": int(memory["other_ets"]),
            "binary": int(memory["binary"]),
        }

    async def aclose(self) -> None:
        await self.client.aclose()


async def declare_many(url: str, queues: list[str], args: dict[str, Any]) -> float:
    """Declare ``queues`` (``WINDOW`` at a time on one channel); returns seconds."""
    connection = await aiormq.connect(url)
    began = time.perf_counter()
    try:
        channel = await connection.channel()
        for first in range(0, len(queues), WINDOW):
            declared = asyncio.gather(
                *(
                    channel.queue_declare(q, durable=True, arguments=args)
                    for q in queues[first : first + WINDOW]
                )
            )
            await asyncio.wait_for(declared, 60.0)
    finally:
        await connection.close()
    return time.perf_counter() - began


async def delete_many(admin_url: str, vhost: str, queues: list[str]) -> int:
    """Delete ``queues`` through the management API (missing ones are skipped); returns how
    many were deleted. (Over AMQP, a channel that just declared hundreds of quorum queues was
    seen to wait minutes for a ``queue.delete-ok``; the HTTP API answers in milliseconds.)"""
    parts = httpx.URL(admin_url)
    async with httpx.AsyncClient(
        base_url=f"{parts.scheme}://{parts.host}:{parts.port or 15672}",
        auth=(parts.username or "guest", parts.password or "guest"),
        timeout=60.0,
    ) as client:
        deleted = 0
        path = f"/api/queues/{quote(vhost, safe='')}/"
        for first in range(0, len(queues), WINDOW):
            chunk = queues[first : first + WINDOW]
            answers = await asyncio.gather(
                *(client.delete(path + quote(q, safe="")) for q in chunk),
                return_exceptions=True,
            )
            deleted += sum(
                1 for a in answers if isinstance(a, httpx.Response) and a.status_code == 204
            )
        return deleted


async def measure_queue_memory(
    settings: Settings, count: int, types: tuple[str, ...], log: Callable[[str], None]
) -> dict[str, Any]:
    """Bytes of node memory per queue, for each queue type, ``count`` queues at a time."""
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    admin_url = settings.broker_admin_url.get_secret_value()
    memory = NodeMemory(admin_url)
    out: dict[str, Any] = {"queues": count}
    rabbit = pid_listening_on(urlsplit(url).port or 5672) or -1
    first = sample([rabbit])
    await asyncio.sleep(IDLE_WINDOW_S)
    out["rabbit_idle_cores_before"] = round(cores(first, sample([rabbit]), [rabbit]), 3)
    try:
        for queue_type in types:
            queues = [f"{names.ns}.qmem.{queue_type}.{i}" for i in range(count)]
            before = await memory.breakdown()
            try:
                declare_s = await declare_many(url, queues, arguments(queue_type, names))
                await asyncio.sleep(5.0)  # let the new processes settle (first GCs)
                after = await memory.breakdown()
                first = sample([rabbit])
                await asyncio.sleep(IDLE_WINDOW_S)
                idle_cores = cores(first, sample([rabbit]), [rabbit])
            finally:
                delete_began = time.perf_counter()
                deleted = await delete_many(admin_url, vhost_of(url), queues)
                delete_s = time.perf_counter() - delete_began
            per_queue = {k: round((after[k] - before[k]) / count) for k in after}
            out[queue_type] = {
                "bytes_per_queue": per_queue,
                "rabbit_idle_cores": round(idle_cores, 3),
                "declare_s": round(declare_s, 1),
                "declares_per_s": round(count / declare_s),
                "delete_s": round(delete_s, 1),
                "deleted": deleted,
                "before": before,
                "after": after,
            }
            log(
                f"  {count} {queue_type} queues: {per_queue['rss'] / 1024:.1f} KiB RSS/queue "
                f"(erlang {per_queue['erlang'] / 1024:.1f} KiB), RabbitMQ idle at "
                f"{idle_cores:.2f} cores, declared in {declare_s:.1f} s, "
                f"deleted {deleted} in {delete_s:.1f} s"
            )
    finally:
        await memory.aclose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queuemem", description=__doc__)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--types", default="classic,quorum")
    args = parser.parse_args(argv)
    settings = new_settings()
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())

    def log(text: str) -> None:
        print(text, flush=True)

    result = asyncio.run(measure_queue_memory(settings, args.count, types, log))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
