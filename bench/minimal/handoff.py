"""The minimal fenced hand-off: a dispatcher process and worker processes.

    python -m bench.minimal dispatcher --ns NS --machines 8 [--batch 100 --depth 2 ...]
    python -m bench.minimal worker --ns NS --machines 0,1 [--batch 50 --depth 2 ...]

Per batch of requests, the dispatcher makes **one** Redis round trip (``ADMIT_CLAIM``: every
run of the batch admitted and claimed for a machine with a fresh fence), publishes the
assignments as one confirmed window and acks the batch with one ``basic.ack(multiple)``.
Per batch of assignments, a worker makes **one** round trip (``START_FINISH``: every run of
the batch started and finished under its fence; a stale fence or a second delivery changes
nothing), publishes the outcomes as one confirmed window and acks once. The dispatcher
consumes the outcomes and acks them once per batch.

What it leaves out on purpose: validation, selection, slots, sessions, secrets, the outbox
stream (the run's hash is the record a sweeper would re-publish from), events nobody
consumes, metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import Sequence

import aiormq
import redis.asyncio as aioredis

from bench.minimal import amqp
from bench.minimal.names import MinimalNames, amqp_url, redis_url

# ARGV: key prefix, now, then (run id, machine, request body) per run. A request seen again
# (redelivered after a crash) keeps its fence: its assignment is published again and the
# fenced start lets only one delivery run it.
ADMIT_CLAIM = """
local p, now = ARGV[1], ARGV[2]
local n = (#ARGV - 2) / 3
local last = redis.call('INCRBY', p .. 'fence', n)
local out = {}
for i = 0, n - 1 do
  local id, m, body = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  local key = p .. 'run:' .. id
  local fence = last - n + 1 + i
  if redis.call('HSETNX', key, 'f', fence) == 1 then
    redis.call('HSET', key, 'st', 'd', 'm', m, 'at', now, 'req', body)
    redis.call('HSET', p .. 'assigned:' .. m, id, fence)
  else
    fence = tonumber(redis.call('HGET', key, 'f'))
  end
  out[i + 1] = fence
end
return out
"""

# ARGV: key prefix, now, machine, then (run id, fence) per run. Returns 1 per run that this
# call started and finished, 0 for a stale fence or a run already started.
START_FINISH = """
local p, now, m = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV, 2 do
  local id, fence = ARGV[i], ARGV[i + 1]
  local key = p .. 'run:' .. id
  local row = redis.call('HMGET', key, 'st', 'f', 'at')
  if row[1] == 'd' and row[2] == fence then
    redis.call('HSET', key, 'st', 's', 'start', now, 'fin', now)
    redis.call('HDEL', p .. 'assigned:' .. m, id)
    redis.call('ZADD', p .. 'finished', (tonumber(now) - tonumber(row[3])) * 1000, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


class Dispatcher:
    def __init__(
        self,
        names: MinimalNames,
        redis: aioredis.Redis,
        channel: aiormq.abc.AbstractChannel,
        machines: Sequence[str],
        sha: str,
        publish_mode: str,
    ) -> None:
        self.names = names
        self.redis = redis
        self.channel = channel
        self.machines = list(machines)
        self.sha = sha  # of ADMIT_CLAIM
        self.publish_mode = publish_mode
        self._next = 0

    async def on_requests(self, batch: list[amqp.Delivery]) -> None:
        argv: list[str | bytes] = [self.names.key(""), repr(time.time())]
        chosen: list[str] = []
        ids: list[str] = []
        machines, count = self.machines, len(self.machines)
        for message in batch:
            run_id = json.loads(message.body)["run_id"]
            machine = machines[self._next % count]
            self._next += 1
            ids.append(run_id)
            chosen.append(machine)
            argv += (run_id, machine, message.body)
        fences = await self.redis.evalsha(self.sha, 0, *argv)  # type: ignore[misc]
        # The assignment carries the request; run id and fence ride in the properties, so a
        # worker needs no JSON parse to act on it.
        window = [
            (
                self.names.machine_queue(machine),
                message.body,
                amqp.properties(run_id, str(fence)),
            )
            for message, run_id, machine, fence in zip(batch, ids, chosen, fences, strict=True)
        ]
        await amqp.publish(self.channel, window, self.publish_mode)

    async def on_outcomes(self, batch: list[amqp.Delivery]) -> None:
        """The outcome is already recorded (the worker's fenced finish): only acked here."""


class Worker:
    def __init__(
        self,
        names: MinimalNames,
        redis: aioredis.Redis,
        channel: aiormq.abc.AbstractChannel,
        machine: str,
        sha: str,
        publish_mode: str,
    ) -> None:
        self.names = names
        self.redis = redis
        self.channel = channel
        self.machine = machine
        self.sha = sha  # of START_FINISH
        self.publish_mode = publish_mode

    async def on_assignments(self, batch: list[amqp.Delivery]) -> None:
        argv: list[str] = [self.names.key(""), repr(time.time()), self.machine]
        for message in batch:
            props = message.header.properties
            argv += (str(props.message_id), str(props.correlation_id))
        done = await self.redis.evalsha(self.sha, 0, *argv)  # type: ignore[misc]
        outcome = self.names.outcomes
        window = []
        for message, ok in zip(batch, done, strict=True):
            props = message.header.properties
            body = b'{"run_id":"%s","fence":%s,"status":"%s"}' % (
                str(props.message_id).encode(),
                str(props.correlation_id).encode(),
                b"succeeded" if ok else b"stale",
            )
            window.append((outcome, body, amqp.properties(props.message_id)))
        await amqp.publish(self.channel, window, self.publish_mode)


async def serve(args: argparse.Namespace) -> int:
    names = MinimalNames(args.ns)
    redis = aioredis.Redis.from_url(redis_url())
    connections = [await aiormq.connect(amqp_url()) for _ in range(args.connections)]
    opened = 0

    async def channel() -> aiormq.abc.AbstractChannel:
        """A channel per consumer, spread over the connections (each its own socket)."""
        nonlocal opened
        opened += 1
        return await amqp.open_channel(connections[opened % len(connections)], args.prefetch)

    tasks: list[asyncio.Task[None]] = []
    if args.role == "dispatcher":
        machines = [str(i) for i in range(args.machines)]
        sha = await redis.script_load(ADMIT_CLAIM)
        for _ in range(args.consumers):
            ch = await channel()
            d = Dispatcher(names, redis, ch, machines, sha, args.publish)
            tasks.append(asyncio.create_task(_consume(ch, names.requests, d.on_requests, args)))
        ch = await channel()
        d = Dispatcher(names, redis, ch, machines, sha, args.publish)
        tasks.append(asyncio.create_task(_consume(ch, names.outcomes, d.on_outcomes, args)))
    else:
        sha = await redis.script_load(START_FINISH)
        for machine in args.machines.split(","):
            ch = await channel()
            w = Worker(names, redis, ch, machine, sha, args.publish)
            queue = names.machine_queue(machine)
            tasks.append(asyncio.create_task(_consume(ch, queue, w.on_assignments, args)))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    for connection in connections:
        await connection.close()
    await redis.aclose()
    failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
    if failed:
        raise failed[0]  # type: ignore[misc]
    return 0


async def _consume(
    channel: aiormq.abc.AbstractChannel,
    queue: str,
    handle: amqp.Handler,
    args: argparse.Namespace,
) -> None:
    await amqp.serve_batches(channel, queue, handle, batch=args.batch, depth=args.depth)


def add_arguments(parser: argparse.ArgumentParser, *, batch: int, prefetch: int) -> None:
    parser.add_argument("--ns", required=True, help="namespace (Redis <ns>:*, AMQP <ns>.*)")
    parser.add_argument("--batch", type=int, default=batch, help="largest batch taken")
    parser.add_argument("--prefetch", type=int, default=prefetch, help="per consumer")
    parser.add_argument("--depth", type=int, default=2, help="batches handled at once")
    parser.add_argument(
        "--connections", type=int, default=1, help="AMQP connections the consumers share"
    )
    parser.add_argument(
        "--publish",
        choices=amqp.PUBLISH_MODES,
        default="frames",
        help="a window as one frame write (frames) or basic_publish per message (aiormq)",
    )
