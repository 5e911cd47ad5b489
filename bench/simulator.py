"""``python -m bench.simulator``: one process that speaks the worker protocol for thousands of
machines, through one AMQP connection.

It stands for a fleet the machine could not run as real workers (one process per machine):

* **heartbeats** of every machine, each every ``heartbeat_interval_s``, spread evenly over the
  interval, exactly as ``workers.heartbeat`` builds them (sessions, running runs with their
  fence, last outcomes, the public key, capacity); a share ``--churn`` of the heartbeats
  carries a changed session (a user signs in or out), and the serving machines' running runs
  change as runs come and go;
* on the **serving** machines (those the measured runs target), the assignments of the
  machine's queue are started with a fenced ``start`` request, run for no time, and reported
  with a ``finish`` request, both to ``<ns>.reports`` and answered on the machine's replies
  queue, as ``workers.adapters.amqp_link`` does.

Every message carries the machine's own broker identity as ``user_id``, which RabbitMQ accepts
from this one connection only because the simulator's user has RabbitMQ's ``impersonator`` tag:
a bench-only identity created by ``bench/livefleet.py``, never one of the product's principals.
The dispatcher authenticates these messages as it authenticates a real worker's.

What it sent is written to ``--stats`` (JSON) every half second.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiormq
from aiormq.abc import DeliveredMessage

from dispatcher.models import FinishedRef, Heartbeat, RunningRef, Session, SessionState
from dispatcher.names import Names
from dispatcher.settings import Settings

RECENT_OUTCOMES = 50  # as workers.runs keeps
TICK_S = 0.05
PREFETCH = 50


@dataclass
class SimulatedMachine:
    """What a worker would know about its machine."""

    machine_id: str
    user_id: str
    worker_id: str
    sessions: tuple[Session, ...] = ()
    running: dict[str, int] = field(default_factory=dict)
    finished: collections.deque[FinishedRef] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_OUTCOMES)
    )


@dataclass
class Counts:
    heartbeats: int = 0
    session_changes: int = 0
    assignments: int = 0
    starts: int = 0
    finishes: int = 0
    replies: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class FleetSimulator:
    def __init__(
        self,
        *,
        url: str,
        names: Names,
        machine_ids: list[str],
        serving: set[str],
        interval_s: float,
        churn: float,
        public_key: str,
        seed: int = 7,
    ) -> None:
        self.url = url
        self.names = names
        self.interval_s = interval_s
        self.churn = churn
        self.random = random.Random(seed)
        # One key for the whole fleet, the same across simulator processes: the dispatcher
        # pins a machine's key at its first heartbeat and refuses any other afterwards.
        self.public_key = public_key
        run = f"{self.random.getrandbits(32):08x}"
        self.machines = {
            m: SimulatedMachine(m, names.machine_user(m), f"sim-{run}-{m}") for m in machine_ids
        }
        self.order = list(machine_ids)
        self.random.shuffle(self.order)  # machines of one group do not beat together
        self.serving = serving
        self.counts = Counts()
        self._ids = 0
        self._waiting: dict[str, tuple[str, str, list[tuple[str, int]]]] = {}
        self._assigned: dict[str, list[tuple[str, int]]] = {}
        self._outcomes: dict[str, list[tuple[str, int]]] = {}
        self._flush_scheduled = False
        self._last_tag = 0
        self._acked = 0
        self.beats: aiormq.Channel | None = None
        self.work: aiormq.Channel | None = None  # the assignments' (and requests') channel

    # ---- heartbeats -------------------------------------------------------------------------
    def heartbeat(self, machine: SimulatedMachine) -> bytes:
        if self.random.random() < self.churn:
            self.counts.session_changes += 1
            if machine.sessions:
                machine.sessions = ()
            else:
                user = f"CONTOSO\\user-{self.random.randrange(1000)}"
                machine.sessions = (Session(user=user, state=SessionState.active),)
        return (
            Heartbeat(
                machine_id=machine.machine_id,
                worker_id=machine.worker_id,
                sent_at=time.time(),
                sessions=machine.sessions,
                running=tuple(RunningRef(run_id=r, fence=f) for r, f in machine.running.items()),
                finished=tuple(machine.finished),
                public_key=self.public_key,
                capacity=10,
            )
            .model_dump_json()
            .encode()
        )

    async def beat_forever(self) -> None:
        """Each machine once per interval, in slices every ``TICK_S``."""
        assert self.beats is not None
        order, position = self.order, 0.0
        per_tick = len(order) * TICK_S / self.interval_s
        next_tick = time.monotonic()
        while True:
            first = int(position)
            position += per_tick
            for index in range(first, int(position)):
                machine = self.machines[order[index % len(order)]]
                await self.publish(
                    self.beats, self.names.heartbeats_exchange, "", machine, "heartbeat",
                    self.heartbeat(machine),
                )  # fmt: skip
                self.counts.heartbeats += 1
            next_tick += TICK_S
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))

    async def publish(
        self,
        channel: aiormq.Channel,
        exchange: str,
        routing_key: str,
        machine: SimulatedMachine,
        kind: str,
        body: bytes,
    ) -> None:
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_type=kind,
            user_id=machine.user_id,
        )
        await channel.basic_publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties, wait=False
        )

    # ---- starts and outcomes ----------------------------------------------------------------
    async def on_assignment(self, message: DeliveredMessage) -> None:
        data = json.loads(message.body)
        machine_id = str(data["machine_id"])
        run_id = str(data["request"]["run_id"])
        self._assigned.setdefault(machine_id, []).append((run_id, int(data["fence"])))
        self._last_tag = max(self._last_tag, int(message.delivery_tag or 0))
        self.counts.assignments += 1
        self._schedule_flush()

    async def on_reply(self, message: DeliveredMessage) -> None:
        reply = json.loads(message.body)
        self.counts.replies += 1
        asked = self._waiting.pop(str(reply["correlation_id"]), None)
        if asked is None:
            return
        op, machine_id, items = asked
        machine = self.machines[machine_id]
        for (run_id, fence), result in zip(items, reply["results"], strict=True):
            if op == "start" and result.get("result") == "started":
                machine.running[run_id] = fence  # a zero-length flow: over at once
                self._outcomes.setdefault(machine_id, []).append((run_id, fence))
            elif op == "finish":
                machine.running.pop(run_id, None)
                machine.finished.append(FinishedRef(run_id=run_id, fence=fence, status="succeeded"))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.flush()))

    async def flush(self) -> None:
        """One start request per machine for what arrived, one finish request per machine for
        what ended; the assignments are acked once their start is asked (a worker acks when
        the start is recorded; a lost start is the dispatcher's unstarted-run sweep's)."""
        self._flush_scheduled = False
        assert self.work is not None
        tag = self._last_tag  # assignments delivered later are asked in the next flush
        assigned, self._assigned = self._assigned, {}
        outcomes, self._outcomes = self._outcomes, {}
        now = time.time()
        for machine_id, items in assigned.items():
            starts = [{"run_id": r, "fence": f, "deadline": now + 600} for r, f in items]
            await self.ask(machine_id, "start", items, starts=starts)
            self.counts.starts += len(items)
        for machine_id, items in outcomes.items():
            reported = [
                {"run_id": r, "fence": f, "status": "succeeded", "error": None, "outputs": None}
                for r, f in items
            ]
            await self.ask(machine_id, "finish", items, outcomes=reported)
            self.counts.finishes += len(items)
        # Flushes overlap (one waits on a publish while the next one runs): a flush acks only
        # past the last tag acked, since acking a tag twice is a channel error that closes it.
        if assigned and tag > self._acked:
            self._acked = tag
            await self.work.basic_ack(tag, multiple=True)

    async def ask(
        self, machine_id: str, op: str, items: list[tuple[str, int]], **fields: Any
    ) -> None:
        assert self.work is not None
        machine = self.machines[machine_id]
        self._ids += 1
        correlation_id = f"{machine.worker_id}-{self._ids}"
        self._waiting[correlation_id] = (op, machine_id, items)
        request = {
            "op": op,
            "machine_id": machine_id,
            "worker_id": machine.worker_id,
            "correlation_id": correlation_id,
            **fields,
        }
        body = json.dumps(request).encode()
        await self.publish(self.work, self.names.reports_exchange, "report", machine, op, body)

    # ---- the process ------------------------------------------------------------------------
    async def consume(self, connection: aiormq.abc.AbstractConnection) -> None:
        """Consume the serving machines' queues and replies queues. The dispatcher declares a
        machine's queues at its first heartbeat: until then the consume fails (and closes its
        channel), so it is tried again, as a worker starting before its dispatcher would."""
        number = 10  # fresh channel numbers: a number the broker just closed may not be reused
        while True:
            work = cast(
                aiormq.Channel,
                await connection.channel(channel_number=number, publisher_confirms=False),
            )
            replies = await connection.channel(channel_number=number + 1, publisher_confirms=False)
            number += 2
            await work.basic_qos(prefetch_count=PREFETCH)
            self.work = work
            self._last_tag = self._acked = 0  # delivery tags count per channel
            try:
                for machine_id in sorted(self.serving):
                    await work.basic_consume(
                        self.names.machine_queue(machine_id), self.on_assignment
                    )
                    await replies.basic_consume(
                        self.names.machine_replies_queue(machine_id), self.on_reply, no_ack=True
                    )
            except aiormq.exceptions.ChannelNotFoundEntity:
                for channel in (work, replies):
                    if not channel.is_closed:
                        await channel.close()
                await asyncio.sleep(0.5)
                continue
            return

    async def run(self, stats: Path) -> None:
        connection = await aiormq.connect(self.url)
        try:
            # Plain channels (the worker's adapter confirms its publishes; the simulator's cost
            # is not what is measured, and heartbeats are hints that may be lost anyway).
            self.beats = cast(aiormq.Channel, await connection.channel(publisher_confirms=False))
            beating = asyncio.create_task(self.beat_forever())
            await self.consume(connection)
            began = time.time()
            try:
                while not beating.done():
                    counts = {"at": time.time(), "since": began, **self.counts.as_dict()}
                    # Written aside and renamed: the bench never reads a half-written file.
                    partial = stats.with_suffix(".tmp")
                    partial.write_text(json.dumps(counts))
                    partial.replace(stats)
                    await asyncio.sleep(0.5)
                await beating
            finally:
                beating.cancel()
        finally:
            await connection.close()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.simulator", description=__doc__)
    parser.add_argument("--url", required=True, help="AMQP URL of the impersonator identity")
    parser.add_argument(
        "--machines", type=Path, required=True, help='JSON {"all", "serving", "public_key"}'
    )
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--churn", type=float, default=0.02, help="share of session changes")
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> None:
    settings = Settings.load()  # the namespace and heartbeat interval, from the environment
    fleet = json.loads(args.machines.read_text())
    simulator = FleetSimulator(
        url=args.url,
        names=Names(settings.namespace),
        machine_ids=list(fleet["all"]),
        serving=set(fleet["serving"]),
        interval_s=settings.heartbeat_interval_s,
        churn=args.churn,
        public_key=str(fleet["public_key"]),
    )
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await simulator.run(args.stats)


def main(argv: list[str] | None = None) -> int:
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(main_async(parse(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
