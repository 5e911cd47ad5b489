"""The baseline: the physical limit of our design on this machine.

A raw aio-pika + redis-py pipeline that moves a run through the same AMQP hops and issues the
same Redis commands per run as the dispatcher and the worker do (see bench/README.md, "Hops
and round trips"), with no logic: no validation, no admission, no selection, no secrets, no
ledger. It is written in the batched style the stack-limits notes recommend: take the
deliveries that are ready (at most ``batch``), one pipeline per stage for the whole batch,
publishes gathered with their confirms awaited together, one ``ack(multiple=True)``.

    python -m bench.baseline dispatcher --machines m1,m2     (settings from RUNDISPATCH_*)
    python -m bench.baseline worker --machine m1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from bench.fleet import LIVE_CONNECTIONS
from dispatcher.adapters.outbox import FORGET_AFTER_S
from dispatcher.adapters.redis.connection import make_redis
from dispatcher.core.placement import PREFETCH_PER_LANE
from dispatcher.core.principals import REPLIES_ARGUMENTS
from dispatcher.settings import Settings

# The same state changes as the product's scripts, as hashes, a zset and outbox stream
# entries, without any check. Each returns the outbox ids and the message bodies it recorded.
ADMIT = """
redis.call('HSET', KEYS[1], 'req', ARGV[1], 'status', '"queued"')
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
local body = '{"status":"queued",' .. string.sub(ARGV[1], 2)
return {redis.call('XADD', KEYS[2], '*', 'k', 'event', 'b', body), body}
"""
CLAIM = """
redis.call('HSET', KEYS[1], 'status', '"dispatched"', 'machine_id', ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], 'unattended|1|user')
local req = redis.call('HGET', KEYS[1], 'req')
local event = '{"status":"dispatched",' .. string.sub(req, 2)
local assignment = '{"fence":1,"machine_id":"' .. ARGV[1] .. '","request":' .. req .. '}'
return {redis.call('XADD', KEYS[2], '*', 'k', 'event', 'b', event), event,
        redis.call('XADD', KEYS[2], '*', 'k', 'assign', 'b', assignment), assignment}
"""
START = """
redis.call('HSET', KEYS[1], 'status', '"running"', 'started_at', ARGV[1])
local req = redis.call('HGET', KEYS[1], 'req')
local event = '{"status":"running",' .. string.sub(req, 2)
return {redis.call('XADD', KEYS[2], '*', 'k', 'event', 'b', event), event}
"""
FINISH = """
redis.call('HSET', KEYS[1], 'status', '"succeeded"', 'finished_at', ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
local req = redis.call('HGET', KEYS[1], 'req')
local event = '{"status":"succeeded",' .. string.sub(req, 2)
return {redis.call('XADD', KEYS[2], '*', 'k', 'event', 'b', event), event}
"""
SCRIPTS = {"admit": ADMIT, "claim": CLAIM, "start": START, "finish": FINISH}

# A heartbeat-sized value for the machine views the baseline reads (the product stores ~300 B).
LIVE_VALUE = json.dumps(
    {"machine_id": "m", "worker_id": "w" * 40, "sent_at": 0.0, "sessions": [], "running": []}
    | {"public_key": "k" * 44, "capacity": 1}
)


@dataclass(frozen=True)
class BaselineNames:
    """AMQP names ``<ns>.bl.*`` and Redis keys ``<ns>:bl:*`` of the baseline."""

    ns: str

    @property
    def requests(self) -> str:
        return f"{self.ns}.bl.requests"

    @property
    def events(self) -> str:
        return f"{self.ns}.bl.events"

    @property
    def machines(self) -> str:
        return f"{self.ns}.bl.machines"

    @property
    def signals(self) -> str:
        return f"{self.ns}.bl.signals"

    @property
    def reports(self) -> str:
        return f"{self.ns}.bl.reports"

    def machine_queue(self, machine_id: str) -> str:
        return f"{self.ns}.bl.machine.{machine_id}"

    def replies_queue(self, machine_id: str) -> str:
        return f"{self.ns}.bl.machine.{machine_id}.replies"

    @staticmethod
    def replies_key(machine_id: str) -> str:
        return f"{machine_id}.replies"

    def key(self, *parts: str) -> str:
        return ":".join((self.ns, "bl", *parts))

    @property
    def finished(self) -> str:
        return self.key("finished")

    def queues(self, machine_ids: Sequence[str]) -> list[str]:
        return [
            self.requests,
            self.signals,
            self.reports,
            *(self.machine_queue(m) for m in machine_ids),
            *(self.replies_queue(m) for m in machine_ids),
        ]

    def exchanges(self) -> list[str]:
        return [self.requests, self.events, self.machines, self.reports]


def quorum(ns: str) -> dict[str, Any]:
    """The product's queue arguments (quorum, delivery limit, dead-letter exchange)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": f"{ns}.bl.dead",
    }


async def declare_topology(settings: Settings, machine_ids: Sequence[str]) -> None:
    """The baseline's exchanges and queues, the same types as the product's, and the keys the
    placement reads look at."""
    names = BaselineNames(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        requests = await channel.declare_exchange(
            names.requests, aio_pika.ExchangeType.DIRECT, durable=True
        )
        queue = await channel.declare_queue(
            names.requests, durable=True, arguments=quorum(names.ns)
        )
        await queue.bind(requests, "submit")
        events = await channel.declare_exchange(
            names.events, aio_pika.ExchangeType.TOPIC, durable=True
        )
        signals = await channel.declare_queue(
            names.signals, durable=True, arguments=quorum(names.ns)
        )
        await signals.bind(events, "run.succeeded")
        machines = await channel.declare_exchange(
            names.machines, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for machine_id in machine_ids:
            mq = await channel.declare_queue(
                names.machine_queue(machine_id), durable=True, arguments=quorum(names.ns)
            )
            await mq.bind(machines, machine_id)
            # The product's replies queue on one node: classic, answers expire.
            replies = await channel.declare_queue(
                names.replies_queue(machine_id), durable=True, arguments=dict(REPLIES_ARGUMENTS)
            )
            await replies.bind(machines, names.replies_key(machine_id))
        reports = await channel.declare_exchange(
            names.reports, aio_pika.ExchangeType.DIRECT, durable=True
        )
        reports_queue = await channel.declare_queue(
            names.reports, durable=True, arguments=quorum(names.ns)
        )
        await reports_queue.bind(reports, "report")
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.set(names.key("version"), 1)
        # As many lanes as the product's placement reads: one per live connection.
        lanes = {f"{connection}|unattended|normal": 1.0 for connection in LIVE_CONNECTIONS}
        pipe.zadd(names.key("lanes"), lanes)
        for machine_id in machine_ids:
            pipe.set(names.key("live", machine_id), LIVE_VALUE)
            pipe.zadd(names.key("hb"), {machine_id: time.time()})
        await pipe.execute()
    finally:
        await redis.aclose()


# ---- the batched consumer -------------------------------------------------------------------
BatchHandler = Callable[[list[AbstractIncomingMessage]], Awaitable[None]]


async def consume_batches(
    connection: aio_pika.abc.AbstractRobustConnection,
    queue_name: str,
    handler: BatchHandler,
    *,
    batch: int,
    prefetch: int,
) -> asyncio.Task[None]:
    """Take what is delivered (no linger), at most ``batch``, hand it to ``handler``."""
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(queue_name, ensure=False)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    await queue.consume(inbox.put, no_ack=False)

    async def loop() -> None:
        while True:
            items = [await inbox.get()]
            while len(items) < batch and not inbox.empty():
                items.append(inbox.get_nowait())
            await handler(items)

    return asyncio.create_task(loop())


def persistent(body: bytes, kind: str) -> aio_pika.Message:
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        type=kind,
    )


class Stage:
    """Redis and AMQP handles shared by the baseline's processes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = BaselineNames(settings.namespace)
        self.redis = make_redis(settings)
        self.sha: dict[str, str] = {}
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self.events: AbstractExchange | None = None
        self.machines: AbstractExchange | None = None
        self.reports: AbstractExchange | None = None
        self._confirmed: list[bytes] = []
        self._flusher: asyncio.Task[None] | None = None

    def outbox_done(self, ids: Sequence[bytes]) -> None:
        """``XDEL`` confirmed outbox entries 250 ms later, many per round trip (as the
        product's ``OutboxPublisher`` does)."""
        self._confirmed.extend(ids)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(FORGET_AFTER_S)
        ids, self._confirmed = self._confirmed, []
        await self.redis.xdel(self.names.key("outbox"), *ids)

    async def open(self) -> None:
        for name, source in SCRIPTS.items():
            self.sha[name] = await self.redis.script_load(source)
        self.connection = await aio_pika.connect_robust(self.settings.amqp_url.get_secret_value())
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.events = await self.channel.get_exchange(self.names.events, ensure=False)
        self.machines = await self.channel.get_exchange(self.names.machines, ensure=False)
        self.reports = await self.channel.get_exchange(self.names.reports, ensure=False)

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        await self.redis.aclose()

    async def publish_events(self, bodies: Sequence[bytes], status: str) -> None:
        assert self.events is not None
        await asyncio.gather(
            *(
                self.events.publish(persistent(b, "event"), f"run.{status}", mandatory=False)
                for b in bodies
            )
        )


# ---- the dispatcher -------------------------------------------------------------------------
class BaselineDispatcher(Stage):
    def __init__(self, settings: Settings, machine_ids: Sequence[str], slots: int) -> None:
        super().__init__(settings)
        self.machine_ids = list(machine_ids)
        self._next = 0
        self._admitted: collections.deque[str] = collections.deque()
        # Runs in flight are bounded as the product's slots bound them (a counter, no per-
        # machine bookkeeping): a pass places what the finished runs made room for, so passes
        # come as often as in the product and cost the same round trips per run.
        self._free = slots * len(self.machine_ids)
        self._wakeup = asyncio.Event()

    async def on_requests(self, batch: list[AbstractIncomingMessage]) -> None:
        k = self.names
        ids = [str(json.loads(m.body)["run_id"]) for m in batch]
        await self.redis.get(k.key("version"))  # fleet.load(): the version counter
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for run_id, message in zip(ids, batch, strict=True):
            pipe.evalsha(
                self.sha["admit"],
                3,
                k.key("run", run_id),
                k.key("outbox"),
                k.key("lane"),
                message.body,
                repr(now),
                run_id,
            )
        admitted = await pipe.execute()  # admit.lua, one per run
        self.request_pass(ids)  # queued: placement need not wait for the events' confirms
        await self.publish_events([a[1] for a in admitted], "queued")
        self.outbox_done([a[0] for a in admitted])
        await batch[-1].ack(multiple=True)

    def request_pass(self, run_ids: Sequence[str] = ()) -> None:
        """Ask for a placement pass (coalesced with the passes already asked for, as the
        product's ``Placer`` does)."""
        self._admitted.extend(run_ids)
        self._wakeup.set()

    async def place_forever(self) -> None:
        """Passes one at a time; a pass's window is confirmed while the next pass reads and
        claims, and goes out once the window before it is confirmed (as the product's
        ``Placer`` loop does)."""
        sending: asyncio.Task[Any] | None = None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # As many heads per lane as the pass could place (the product's heads_to_read).
            per_lane = max(1, min(PREFETCH_PER_LANE, self._free))
            take = min(self._free, len(self._admitted))
            self._free -= take
            sending = await self.place(
                [self._admitted.popleft() for _ in range(take)], per_lane, sending
            )

    async def placement_reads(self, per_lane: int) -> None:
        """What a placement pass reads before it decides: the fleet version, the lanes, the
        machine views of the target, the first members of every lane."""
        k = self.names
        await self.redis.get(k.key("version"))
        lanes = await self.redis.zrange(k.key("lanes"), 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for machine_id in self.machine_ids:
            pipe.zscore(k.key("hb"), machine_id)
            pipe.get(k.key("live", machine_id))
            pipe.hgetall(k.key("assigned", machine_id))
        await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for _lane in lanes:
            pipe.zrange(k.key("lane"), 0, per_lane - 1, withscores=True)
        await pipe.execute()

    async def place(
        self, run_ids: list[str], per_lane: int, previous: asyncio.Task[Any] | None = None
    ) -> asyncio.Task[Any] | None:
        """One pass; returns its window's publication, under way (or ``previous``)."""
        k = self.names
        await self.placement_reads(per_lane)
        if not run_ids:
            return previous
        chosen = []
        for _ in run_ids:
            chosen.append(self.machine_ids[self._next % len(self.machine_ids)])
            self._next += 1
        pipe = self.redis.pipeline(transaction=False)
        for run_id, machine_id in zip(run_ids, chosen, strict=True):
            pipe.evalsha(
                self.sha["claim"],
                4,
                k.key("run", run_id),
                k.key("outbox"),
                k.key("assigned", machine_id),
                k.key("lane"),
                machine_id,
                run_id,
            )
        claimed = await pipe.execute()  # claim.lua, one per run
        assert self.events is not None and self.machines is not None
        publishes = []
        for (_, event, _, assignment), machine_id in zip(claimed, chosen, strict=True):
            publishes.append(
                self.events.publish(persistent(event, "event"), "run.dispatched", mandatory=False)
            )
            publishes.append(
                self.machines.publish(persistent(assignment, "assign"), machine_id, mandatory=True)
            )
        if previous is not None:
            await previous
        done = [c[0] for c in claimed] + [c[2] for c in claimed]

        async def window() -> None:
            await asyncio.gather(*publishes)
            self.outbox_done(done)

        return asyncio.create_task(window())

    async def on_reports(self, batch: list[AbstractIncomingMessage]) -> None:
        """The workers' fenced starts and outcomes (the product's ``WorkerRequests``): one
        pipeline of start.lua / finish.lua for every run of the batch, the events and the
        answers (one per request, on the machine's replies queue) as one confirmed window,
        one multi-ack."""
        k = self.names
        asked = [json.loads(m.body) for m in batch]
        now = repr(time.time())
        pipe = self.redis.pipeline(transaction=False)
        for request in asked:
            for run_id in request["runs"]:
                if request["op"] == "start":
                    pipe.evalsha(self.sha["start"], 2, k.key("run", run_id), k.key("outbox"), now)
                else:
                    pipe.evalsha(
                        self.sha["finish"],
                        4,
                        k.key("run", run_id),
                        k.key("outbox"),
                        k.finished,
                        k.key("assigned", request["machine_id"]),
                        now,
                        run_id,
                    )
        results = iter(await pipe.execute())
        assert self.events is not None and self.machines is not None
        publishes: list[Awaitable[Any]] = []
        outbox = []
        for request in asked:
            status = "started" if request["op"] == "start" else "succeeded"
            for _ in request["runs"]:
                entry, event = next(results)
                outbox.append(entry)
                message = persistent(event, "event")
                publishes.append(self.events.publish(message, f"run.{status}", mandatory=False))
            answer = json.dumps({"correlation_id": request["correlation_id"]}).encode()
            publishes.append(
                self.machines.publish(
                    persistent(answer, "reply"),
                    k.replies_key(request["machine_id"]),
                    mandatory=True,
                )
            )
        await asyncio.gather(*publishes)
        self.outbox_done(outbox)
        await batch[-1].ack(multiple=True)

    async def on_signals(self, batch: list[AbstractIncomingMessage]) -> None:
        self._free += len(batch)  # each run.succeeded frees a slot
        self.request_pass()  # the pass the signal asks for
        await batch[-1].ack(multiple=True)


# ---- the worker -----------------------------------------------------------------------------
class BaselineWorker(Stage):
    """A machine's worker with no Redis rights, as the product's: a batch of assignments is
    started by one request to the dispatcher and acked once its answer came; the runs'
    outcomes are reported by another request, off the consumer's path (the product's
    reporter), answered likewise."""

    def __init__(self, settings: Settings, machine_id: str) -> None:
        super().__init__(settings)
        self.machine_id = machine_id
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._ids = itertools.count()
        self._reports: set[asyncio.Task[None]] = set()

    async def on_replies(self, batch: list[AbstractIncomingMessage]) -> None:
        for message in batch:
            future = self._waiting.pop(json.loads(message.body)["correlation_id"], None)
            if future is not None and not future.done():
                future.set_result(None)
        await batch[-1].ack(multiple=True)

    async def ask(self, op: str, run_ids: Sequence[str]) -> None:
        """One request to the dispatcher, confirmed, and its answer."""
        assert self.reports is not None
        correlation_id = f"{self.machine_id}-{next(self._ids)}"
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        body = json.dumps(
            {
                "op": op,
                "machine_id": self.machine_id,
                "correlation_id": correlation_id,
                "runs": list(run_ids),
            }
        ).encode()
        await self.reports.publish(persistent(body, op), "report", mandatory=True)
        await future

    async def on_assignments(self, batch: list[AbstractIncomingMessage]) -> None:
        ids = [str(json.loads(m.body)["request"]["run_id"]) for m in batch]
        await self.ask("start", ids)  # the fenced starts, recorded by the dispatcher
        await batch[-1].ack(multiple=True)
        task = asyncio.create_task(self.ask("finish", ids))  # zero-length flows: done
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)


async def serve(args: argparse.Namespace) -> int:
    settings = Settings.load()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[None]] = []
    stage: Stage
    if args.role == "dispatcher":
        dispatcher = BaselineDispatcher(settings, args.machines.split(","), args.slots)
        stage = dispatcher
        consumers = [
            (dispatcher.names.requests, dispatcher.on_requests),
            (dispatcher.names.reports, dispatcher.on_reports),
            (dispatcher.names.signals, dispatcher.on_signals),
        ]
    else:
        worker = BaselineWorker(settings, args.machine)
        stage = worker
        consumers = [
            (worker.names.machine_queue(args.machine), worker.on_assignments),
            (worker.names.replies_queue(args.machine), worker.on_replies),
        ]
    await stage.open()
    assert stage.connection is not None
    for queue, handler in consumers:
        tasks.append(
            await consume_batches(
                stage.connection, queue, handler, batch=args.batch, prefetch=args.prefetch
            )
        )
    if args.role == "dispatcher":
        tasks.append(asyncio.create_task(dispatcher.place_forever()))
    done = asyncio.create_task(stop.wait())
    await asyncio.wait([done, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        task.cancel()
    await stage.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    sub = parser.add_subparsers(dest="role", required=True)
    d = sub.add_parser("dispatcher")
    d.add_argument("--machines", required=True, help="comma-separated machine ids")
    d.add_argument("--slots", type=int, default=10, help="runs in flight per machine")
    d.add_argument("--batch", type=int, default=100)
    d.add_argument("--prefetch", type=int, default=200)
    w = sub.add_parser("worker")
    w.add_argument("--machine", required=True)
    w.add_argument("--batch", type=int, default=20)
    w.add_argument("--prefetch", type=int, default=50)
    return asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
