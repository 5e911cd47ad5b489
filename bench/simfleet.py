"""A cheap fleet for the dispatcher-only saturation drain: one process plays every live
machine's worker as fast as it can, so that the drain measures the dispatcher, not the fleet.

``python -m bench.simfleet --machines live-1,live-2,... --counts FILE``

Per machine it speaks the workers' protocol (``dispatcher/usecases/worker_link.py``) over
aiormq used directly, with the identity of the bench's connection (the dispatcher's user, so
it may speak for every machine):

* heartbeats every ``heartbeat_interval_s`` (with a real X25519 public key, so the
  dispatcher seals secrets to it; nothing is ever opened here);
* each batch of ready assignments: **one** ``start`` request for the batch, the deliveries
  acked with one multi-ack; when the start answer comes, **one** ``finish`` request with every
  started run ``succeeded`` (a zero-length flow). A finish is sent only after its start was
  answered, as a worker does (the dispatcher never sees an outcome before its start).

No ledger, no flow task, no secret opened, no validation: what is left is the messages the
dispatcher has to handle. The requests published (starts, finishes) are counted and written
to ``--counts`` as JSON every 0.5 s, so that the bench knows how many messages the dispatcher
consumed per run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from dispatcher.core.principals import REPLIES_ARGUMENTS, admin_user_of, quorum_arguments
from dispatcher.crypto import WorkerKeyPair
from dispatcher.models import Heartbeat
from dispatcher.names import Names
from dispatcher.settings import Settings

PREFETCH = 100  # per machine queue, as a worker's (50) with room for the next batch


class SimFleet:
    def __init__(
        self, settings: Settings, machines: list[str], counts_path: str, state_root: Path
    ) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.machines = machines
        self.counts_path = counts_path
        self.url = settings.amqp_url.get_secret_value()
        self.user = admin_user_of(self.url)
        # Each machine's key where its real worker keeps it (``--state-dir``): the dispatcher
        # pins a machine's key at its first heartbeat and refuses heartbeats with another.
        self.keys: dict[str, WorkerKeyPair] = {}
        for machine in machines:
            state = state_root / f"state-{machine}"
            state.mkdir(parents=True, exist_ok=True)
            self.keys[machine] = WorkerKeyPair.load_or_create(state / "worker.key")
        self.worker_id = f"simfleet-{os.getpid()}"
        self.ids = itertools.count(1)
        self.pending: dict[str, tuple[str, list[dict[str, Any]]]] = {}
        self.counts = {"start": 0, "finish": 0, "assignments": 0, "heartbeats": 0}
        self.channel: aiormq.abc.AbstractChannel | None = None

    def props(self, kind: str, correlation_id: str | None = None) -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(
            delivery_mode=2,
            content_type="application/json",
            message_type=kind,
            user_id=self.user,
            correlation_id=correlation_id,
        )

    async def request(self, op: str, machine_id: str, **fields: Any) -> str:
        assert self.channel is not None
        correlation_id = f"{self.worker_id}-{next(self.ids)}"
        body = {
            "op": op,
            "machine_id": machine_id,
            "worker_id": self.worker_id,
            "correlation_id": correlation_id,
            **fields,
        }
        self.counts[op] += 1
        await self.channel.basic_publish(
            json.dumps(body).encode(),
            exchange=self.names.reports_exchange,
            routing_key="report",
            properties=self.props(op, correlation_id),
        )
        return correlation_id

    async def on_assignments(
        self, channel: aiormq.abc.AbstractChannel, machine_id: str, batch: list[DeliveredMessage]
    ) -> None:
        assert self.channel is not None
        now = time.time()
        starts = []
        for message in batch:
            if message.header.properties.message_type == "cancel":
                continue
            data = json.loads(message.body)
            request = data["request"]
            limit = float(request.get("max_run_s") or data.get("max_run_s") or 3600)
            starts.append(
                {"run_id": request["run_id"], "fence": data["fence"], "deadline": now + limit + 60}
            )
        self.counts["assignments"] += len(starts)
        if starts:
            correlation_id = f"{self.worker_id}-{next(self.ids)}"
            self.pending[correlation_id] = (machine_id, starts)
            body = {
                "op": "start",
                "machine_id": machine_id,
                "worker_id": self.worker_id,
                "correlation_id": correlation_id,
                "starts": starts,
            }
            self.counts["start"] += 1
            await self.channel.basic_publish(
                json.dumps(body).encode(),
                exchange=self.names.reports_exchange,
                routing_key="report",
                properties=self.props("start", correlation_id),
            )
        await channel.basic_ack(batch[-1].delivery.delivery_tag, multiple=True)

    async def on_reply(self, message: DeliveredMessage) -> None:
        reply = json.loads(message.body)
        found = self.pending.pop(str(reply.get("correlation_id")), None)
        if found is None:
            return  # a finish answered: nothing waits for it
        machine_id, starts = found
        outcomes = [
            {"run_id": s["run_id"], "fence": s["fence"], "status": "succeeded", "error": None,
             "outputs": None}
            for s, result in zip(starts, reply["results"], strict=True)
            if result.get("result") == "started"
        ]  # fmt: skip
        if outcomes:
            await self.request("finish", machine_id, outcomes=outcomes)

    async def serve_machine(self, connection: aiormq.abc.AbstractConnection, machine: str) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.basic_qos(prefetch_count=PREFETCH)
        queue = self.names.machine_queue(machine)
        await channel.queue_declare(queue, durable=True, arguments=quorum_arguments(self.names))
        await channel.queue_bind(queue, self.names.machines_exchange, routing_key=machine)
        replies = self.names.machine_replies_queue(machine)
        await channel.queue_declare(replies, durable=True, arguments=REPLIES_ARGUMENTS)
        await channel.queue_bind(
            replies, self.names.machines_exchange, routing_key=self.names.replies_key(machine)
        )
        ready: list[DeliveredMessage] = []
        wakeup = asyncio.Event()

        def put(message: DeliveredMessage) -> None:
            ready.append(message)
            wakeup.set()

        async def reply(message: DeliveredMessage) -> None:
            await self.on_reply(message)

        await channel.basic_consume(queue, put, no_ack=False)  # type: ignore[arg-type]
        await channel.basic_consume(replies, reply, no_ack=True)
        while True:
            await wakeup.wait()
            wakeup.clear()
            while ready:
                batch, ready[:] = ready[:50], ready[50:]
                await self.on_assignments(channel, machine, batch)

    async def heartbeats(self) -> None:
        assert self.channel is not None
        interval = self.settings.heartbeat_interval_s
        while True:
            for machine in self.machines:
                beat = Heartbeat(
                    machine_id=machine,
                    worker_id=self.worker_id,
                    sent_at=time.time(),
                    public_key=self.keys[machine].public_key_b64,
                    capacity=10,
                )
                self.counts["heartbeats"] += 1
                await self.channel.basic_publish(
                    beat.model_dump_json().encode(),
                    exchange=self.names.heartbeats_exchange,
                    routing_key="",
                    properties=self.props("heartbeat"),
                )
            await asyncio.sleep(interval)

    def _write_counts(self) -> None:
        """A small file, written whole then renamed (the bench never reads half of it)."""
        tmp = Path(f"{self.counts_path}.tmp")
        tmp.write_text(json.dumps(self.counts), encoding="ascii")
        tmp.replace(self.counts_path)

    async def write_counts(self) -> None:
        while True:
            self._write_counts()
            await asyncio.sleep(0.5)

    async def run(self) -> None:
        connection = await aiormq.connect(self.url)
        # The requests go out on one channel without confirms: RabbitMQ keeps the order of a
        # channel, and a lost request would only stall the drain (the bench would say so).
        self.channel = await connection.channel(publisher_confirms=False)
        await asyncio.gather(
            self.heartbeats(),
            self.write_counts(),
            *(self.serve_machine(connection, m) for m in self.machines),
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simfleet")
    parser.add_argument("--machines", required=True)
    parser.add_argument("--counts", required=True)
    parser.add_argument("--state-root", required=True, type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    fleet = SimFleet(Settings(), args.machines.split(","), args.counts, args.state_root)
    asyncio.run(fleet.run())


if __name__ == "__main__":
    main()
