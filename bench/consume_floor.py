"""What receiving a heartbeat-sized delivery costs in Python here, before any handling.

Three ways of consuming the same messages (a heartbeat's body and properties as the fleet
simulator publishes them), each acked 1,000 at a time with one multi-ack:

* ``aio-pika``: ``queue.consume(inbox.put)`` with aio-pika's ``IncomingMessage`` (how the
  product consumed before ``dispatcher/adapters/amqp/delivery.py``);
* ``product``: the product's ``LeanQueue`` and ``AmqpDelivery`` (aiormq's deliveries, read
  lazily, on a robust queue);
* ``aiormq``: aiormq's ``basic_consume`` with a bare callback (nothing robust).

Two shapes: ``backlog`` (the queue pre-filled with ``--messages``, drained as fast as it goes)
and ``trickle`` (a publisher process sending ``--rate`` messages a second, spread over 10 ms
ticks, as 10,000 machines' heartbeats arrive; ``--seconds`` measured after a 3 s warm-up).
Prints one JSON line per way and shape: process CPU µs per message. Queues are private to the
run (``bench.env.new_settings`` namespace) and deleted afterwards.

``python -m bench.consume_floor [--messages 30000] [--rate 2000] [--seconds 10]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage

from bench.env import new_settings
from dispatcher.adapters.amqp.delivery import AmqpDelivery, LeanQueue

BATCH = 1000
BODY = json.dumps(
    {
        "machine_id": "m-00001",
        "worker_id": "simfleet-1",
        "sent_at": 1.0e9,
        "sessions": [],
        "running": [],
        "finished": [],
        "public_key": "A" * 44,
        "capacity": 10,
    }
).encode()


def properties() -> aiormq.spec.Basic.Properties:
    return aiormq.spec.Basic.Properties(
        delivery_mode=2, content_type="application/json", message_type="heartbeat", user_id=None
    )


async def publish(url: str, queue: str, count: int | None, rate: int) -> None:
    """``count`` messages as fast as they go, or (``count`` None) ``rate`` a second forever."""
    connection = await aiormq.connect(url)
    channel = await connection.channel(publisher_confirms=False)
    if count is not None:
        for _ in range(count):
            await channel.basic_publish(BODY, routing_key=queue, properties=properties())
        await connection.close()
        return
    began, tick = time.perf_counter(), 0
    while True:
        for _ in range(rate // 100):
            await channel.basic_publish(BODY, routing_key=queue, properties=properties())
        tick += 1
        await asyncio.sleep(max(0.0, began + tick / 100 - time.perf_counter()))


class Consumer:
    """Counts deliveries received and acked, whichever way they were consumed."""

    def __init__(self, target: int = 0) -> None:
        self.acked = 0
        self.target = target
        self.done = asyncio.Event()
        self.ready: list[Any] = []
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def put(self, delivery: Any) -> None:
        self.ready.append(delivery)
        self.wakeup.set()

    async def settle(self, ack: Any) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.ready:
                batch, self.ready = self.ready[:BATCH], self.ready[BATCH:]
                for delivery in batch:
                    _ = delivery.body, delivery.user_id, delivery.headers
                await ack(batch[-1])
                self.acked += len(batch)
                if self.target and self.acked >= self.target:
                    self.done.set()


async def start(way: str, url: str, queue: str, consumer: Consumer) -> Any:
    """Connect and consume ``queue`` the chosen way; the connection (to close)."""

    async def on_delivered(message: DeliveredMessage) -> None:  # the lean ways
        consumer.put(AmqpDelivery(message))

    async def on_incoming(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        consumer.put(message)

    async def ack(last: Any) -> None:
        await last.ack(multiple=True)

    consumer.task = asyncio.create_task(consumer.settle(ack))
    if way == "aiormq":
        raw = await aiormq.connect(url)
        channel = await raw.channel(publisher_confirms=False)
        await channel.basic_qos(prefetch_count=2 * BATCH)
        await channel.basic_consume(queue, on_delivered, no_ack=False)
        return raw
    connection = await aio_pika.connect_robust(url)
    robust = await connection.channel(publisher_confirms=False)
    await robust.set_qos(prefetch_count=2 * BATCH)
    if way == "product":
        robust.QUEUE_CLASS = LeanQueue
        declared = await robust.declare_queue(queue, passive=True)
        await declared.consume(on_delivered, no_ack=False)  # type: ignore[arg-type]
    else:
        declared = await robust.declare_queue(queue, passive=True)
        await declared.consume(on_incoming, no_ack=False)
    return connection


async def wait_for_depth(channel: aiormq.abc.AbstractChannel, queue: str, depth: int) -> None:
    """Until RabbitMQ holds ``depth`` messages in ``queue`` (the publishes are unconfirmed)."""
    for _ in range(600):
        if (await channel.queue_declare(queue, passive=True)).message_count >= depth:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{queue} did not reach {depth} messages in 120 s")


async def measure(way: str, shape: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = new_settings()
    url = settings.amqp_url.get_secret_value()
    queue = f"{settings.namespace}.floor"
    admin = await aiormq.connect(url)
    channel = await admin.channel()
    await channel.queue_declare(queue, durable=True)
    publisher: asyncio.subprocess.Process | None = None
    consumer = Consumer(args.messages if shape == "backlog" else 0)
    try:
        if shape == "backlog":
            await publish(url, queue, args.messages, 0)
            await wait_for_depth(channel, queue, args.messages)
            began_cpu, began = time.process_time(), time.perf_counter()
            connection = await start(way, url, queue, consumer)
            await consumer.done.wait()
            cpu, wall, count = (
                time.process_time() - began_cpu,
                time.perf_counter() - began,
                consumer.acked,
            )
        else:
            connection = await start(way, url, queue, consumer)
            command = [sys.executable, "-m", "bench.consume_floor", "--publish-to", queue]
            publisher = await asyncio.create_subprocess_exec(*command, "--rate", str(args.rate))
            await asyncio.sleep(3.0)
            first, began_cpu, began = consumer.acked, time.process_time(), time.perf_counter()
            await asyncio.sleep(args.seconds)
            cpu, wall = time.process_time() - began_cpu, time.perf_counter() - began
            count = consumer.acked - first
        if consumer.task is not None:
            consumer.task.cancel()
        await connection.close()
    finally:
        if publisher is not None:
            publisher.kill()
            await publisher.wait()
        await channel.queue_delete(queue)
        await admin.close()
    return {
        "way": way,
        "shape": shape,
        "messages": count,
        "msgs_per_s": round(count / wall, 1),
        "cpu_us_per_msg": round(cpu * 1e6 / max(1, count), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.consume_floor",
        description="CPU per delivery received by aio-pika, by the product's lean consumer and "
        "by bare aiormq, from a backlog and from a steady trickle.",
    )
    parser.add_argument("--messages", type=int, default=30_000, help="backlog size (30,000)")
    parser.add_argument("--rate", type=int, default=2_000, help="trickle: messages a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="trickle: measured seconds")
    parser.add_argument("--ways", default="aio-pika,product,aiormq")
    parser.add_argument("--shapes", default="backlog,trickle")
    parser.add_argument("--publish-to", help=argparse.SUPPRESS)  # the trickle's publisher
    args = parser.parse_args(argv)
    if args.publish_to:
        url = new_settings().amqp_url.get_secret_value()
        asyncio.run(publish(url, args.publish_to, None, args.rate))
        return 0
    for shape in args.shapes.split(","):
        for way in args.ways.split(","):
            print(json.dumps(asyncio.run(measure(way, shape, args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
