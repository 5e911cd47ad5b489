"""The raw loop of one hop: consume -> one Redis pipeline -> confirmed publish -> ack.

    python -m bench.minimal stack-loop --ns NS [--batch 100 --prefetch 200 --depth 1]

What any dispatcher on this stack must at least do per message, with nothing of its own: per
batch of ready deliveries (at most ``--batch``), one pipeline with two ``GET`` and one
``HSET`` per message (the reads and the write of the stack-limits reference loop), every
message published on to ``<ns>.stack.out`` (persistent) with the confirms awaited together,
one ``basic.ack(multiple)``. Its rate is the denominator of ``ratio_dispatcher_vs_stack``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiormq
import redis.asyncio as aioredis

from bench.minimal import amqp
from bench.minimal.names import MinimalNames, amqp_url, redis_url


class Loop:
    def __init__(
        self,
        names: MinimalNames,
        redis: aioredis.Redis,
        channel: aiormq.abc.AbstractChannel,
        redis_ops: bool = True,
    ) -> None:
        self.names = names
        self.redis = redis
        self.channel = channel
        self.redis_ops = redis_ops
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
        await amqp.publish_window(self.channel, window)


async def serve(args: argparse.Namespace) -> int:
    names = MinimalNames(args.ns)
    redis = aioredis.Redis.from_url(redis_url())
    connection = await aiormq.connect(amqp_url())
    channel = await amqp.open_channel(connection, args.prefetch)
    loop_ = Loop(names, redis, channel, redis_ops=not args.no_redis)
    task = asyncio.create_task(
        amqp.serve_batches(
            channel, names.stack_in, loop_.on_batch, batch=args.batch, depth=args.depth
        )
    )
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, task], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    await connection.close()
    await redis.aclose()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return 0
