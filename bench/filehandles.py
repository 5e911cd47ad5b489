"""Files RabbitMQ counts for a queue, by type: ``python -m bench.filehandles [--count N]``.

Declares ``--count`` quorum queues, then as many classic queues (durable, as the product
declares them), reads the node's file handle cache (``file_handle_cache:info`` through
``rabbitmqctl eval``: the budget RabbitMQ 3.10 counts queues' files against) after the
declarations and again after one persistent message each, then deletes them. Needs
``rabbitmqctl`` on this host (a local node). Its figures are the ones
``dispatcher/adapters/amqp/node_files.py`` uses (3 per quorum queue, 1 per classic queue that
stored a persistent message).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import uuid
from typing import Any

import aio_pika

from dispatcher.settings import Settings


def file_handle_cache() -> dict[str, int]:
    """The node's ``total_limit`` and ``total_used`` (files for queues)."""
    result = subprocess.run(
        ["rabbitmqctl", "eval", "file_handle_cache:info([total_limit, total_used])."],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return {key: int(value) for key, value in re.findall(r"\{(\w+),(\d+)\}", result.stdout)}


async def measure(url: str, count: int) -> dict[str, object]:
    prefix = f"filehandles-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(url)
    out: dict[str, object] = {"count": count, "before": file_handle_cache()}
    declared: list[str] = []
    try:
        channel = await connection.channel()
        kinds: list[tuple[str, dict[str, Any]]] = [
            ("quorum", {"x-queue-type": "quorum"}),
            ("classic", {}),
        ]
        for kind, arguments in kinds:
            names = [f"{prefix}.{kind}.{i}" for i in range(count)]
            used = file_handle_cache()["total_used"]
            for name in names:
                await channel.declare_queue(name, durable=True, arguments=arguments)
                declared.append(name)
            await asyncio.sleep(2.0)
            after_declare = file_handle_cache()["total_used"]
            for name in names:
                message = aio_pika.Message(b"x", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await channel.default_exchange.publish(message, routing_key=name)
            await asyncio.sleep(2.0)
            after_message = file_handle_cache()["total_used"]
            out[kind] = {
                "files_per_queue_declared": round((after_declare - used) / count, 2),
                "files_per_queue_after_a_persistent_message": round(
                    (after_message - used) / count, 2
                ),
            }
            print(f"{kind}: {out[kind]}", flush=True)
    finally:
        channel = await connection.channel()
        for name in declared:
            await channel.queue_delete(name)
        await connection.close()
    out["after_delete"] = file_handle_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="queues of each type")
    args = parser.parse_args()
    settings = Settings()
    print(json.dumps(asyncio.run(measure(settings.amqp_url.get_secret_value(), args.count))))


if __name__ == "__main__":
    main()
