"""The raw loop of one hop: consume -> one Redis pipeline -> confirmed publish -> ack.

    python -m bench.minimal stack-loop --ns NS [--batch 100 --prefetch 200 --depth 1]

What any dispatcher on this stack must at least do per message, with nothing of its own: per
batch of ready deliveries (at most ``--batch``), one pipeline with two ``GET`` and one
``HSET`` per message (the reads and the write of the stack-limits reference loop), every
message published on to ``<ns>.stack.out`` (persistent) with the confirms awaited together,
one ``basic.ack(multiple)``. Its rate is the denominator of ``ratio_dispatcher_vs_stack``.
``--client aio-pika`` runs the same loop through aio-pika, as the stack-limits reference did.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from bench.minimal import amqp
from bench.minimal.names import MinimalNames, amqp_url, redis_url


class Loop:
    def __init__(
        self,
        names: MinimalNames,
        redis: aioredis.Redis,
        channel: aiormq.abc.AbstractChannel,
        redis_ops: bool = True,
        publish_mode: str = "aiormq",
    ) -> None:
        self.names = names
        self.redis = redis
        self.channel = channel
        self.redis_ops = redis_ops
        self.publish_mode = publish_mode
        self._seq = 0

    async def on_batch(self, batch: list[amqp.Delivery]) -> None:
        out = self.names.stack_out
        window = []
        pipe = self.redis.pipeline(transaction=False)
        for message in batch:
            self._seq += 1
            mid = message.header.properties.message_id or str(self._seq)
            pipe.get(self.names.key(f"s:conn:{self._seq % 10}"))
            pipe.get(self.names.key(f"s:machine:{self._seq % 8}"))
            pipe.hset(self.names.key(f"s:run:{mid}"), "status", "dispatched")
            window.append((out, message.body, amqp.properties(mid)))
        if self.redis_ops:
            await pipe.execute()
        await amqp.publish(self.channel, window, self.publish_mode)


async def aio_pika_loop(
    names: MinimalNames, redis: aioredis.Redis, args: argparse.Namespace
) -> tuple[asyncio.Task[None], Callable[[], Awaitable[None]]]:
    """The same loop written as the stack-limits reference wrote it: aio-pika's robust
    connection, ``queue.consume`` into an ``asyncio.Queue``, ``Exchange.publish`` (which holds
    the channel lock until each frame is written) gathered, ``Message.ack(multiple)``."""
    connection = await aio_pika.connect_robust(amqp_url())
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=args.prefetch)
    queue = await channel.get_queue(names.stack_in, ensure=False)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(inbox.put, no_ack=False)
    exchange = channel.default_exchange
    seq = 0

    async def forever() -> None:
        nonlocal seq
        while True:
            batch = [await inbox.get()]
            while len(batch) < args.batch and not inbox.empty():
                batch.append(inbox.get_nowait())
            pipe = redis.pipeline(transaction=False)
            for message in batch:
                seq += 1
                pipe.get(names.key(f"s:conn:{seq % 10}"))
                pipe.get(names.key(f"s:machine:{seq % 8}"))
                pipe.hset(names.key(f"s:run:{message.message_id}"), "status", "dispatched")
            if not args.no_redis:
                await pipe.execute()
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            m.body,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=m.message_id,
                        ),
                        names.stack_out,
                    )
                    for m in batch
                )
            )
            await batch[-1].ack(multiple=True)

    return asyncio.create_task(forever()), connection.close


async def serve(args: argparse.Namespace) -> int:
    names = MinimalNames(args.ns)
    redis = aioredis.Redis.from_url(redis_url())
    if args.client == "aio-pika":
        task, close = await aio_pika_loop(names, redis, args)
    else:
        connection = await aiormq.connect(amqp_url())
        channel = await amqp.open_channel(connection, args.prefetch)
        loop_ = Loop(names, redis, channel, not args.no_redis, args.publish)
        task = asyncio.create_task(
            amqp.serve_batches(
                channel, names.stack_in, loop_.on_batch, batch=args.batch, depth=args.depth
            )
        )
        close = connection.close
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, task], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    await close()
    await redis.aclose()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return 0
