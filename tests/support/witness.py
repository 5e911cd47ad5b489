"""Independent witnesses for the fault tests.

Whether a run was lost, ran twice or ended twice must not be read from the product's own
bookkeeping (the workers' ledgers, which the worker also uses to refuse re-runs, or the Redis
timeline). Two witnesses the product does not write:

- ``WitnessFlow``: the desktop flow itself (a ``sh`` script run by the ``command`` executor)
  appends ``run_id|fence|machine|time`` to a witness file of its own, one per machine, and
  fsyncs it before the flow does anything else, so every execution that began is on disk even
  when its worker is SIGKILLed a moment later. The machine is the one the test started the
  worker for (an argument of the command), not what the worker says. A flow whose inputs ask
  for ``duration_s`` >= 1 waits while the machine's gate file exists: the test holds long
  flows with it to kill a worker while they certainly run. Inputs with ``"oversized": true``
  make it print about 20 KB of outputs.
- ``Bystander``: a queue of the test's own, bound to the events exchange (``run.#``) on a
  direct connection to the broker, that records every event a subscriber would see.

Lines that do not parse are errors, never skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from dispatcher.names import Names, event_of

SCRIPT = r"""#!/bin/sh
# A flow that witnesses its own execution: $1 witness file, $2 machine id, $3 gate file.
inputs=$(cat)
duration=$(printf '%s' "$inputs" | sed -n 's/.*"duration_s": *\([0-9.]*\).*/\1/p')
run_id=$(printf '%s' "$inputs" | sed -n 's/.*"run_id": *"\([^"]*\)".*/\1/p')
fence=$(printf '%s' "$inputs" | sed -n 's/.*"fence": *\([0-9]*\).*/\1/p')
printf '%s|%s|%s|%s\n' "$run_id" "$fence" "$2" "$(date +%s.%N)" >> "$1"
sync "$1"
if [ "${duration%%.*}" -ge 1 ] 2>/dev/null; then
  while [ -e "$3" ]; do sleep 0.05; done
fi
sleep "${duration:-0}"
case "$inputs" in
  *'"oversized": true'*)
    pad=$(head -c 20000 /dev/zero | tr '\0' x)
    printf '{"witnessed": true, "pad": "%s"}' "$pad" ;;
  *) printf '{"witnessed": true}' ;;
esac
"""


@dataclass(frozen=True)
class Witnessed:
    """One execution as the flow itself recorded it."""

    run_id: str
    fence: int
    machine: str
    at: float


class WitnessFlow:
    """The witness flow's script, one witness file and one gate file per machine."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "witness"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.script = self.dir / "flow.sh"
        self.script.write_text(SCRIPT)
        self.script.chmod(self.script.stat().st_mode | stat.S_IXUSR)

    def file(self, machine_id: str) -> Path:
        return self.dir / f"{machine_id}.log"

    def gate(self, machine_id: str) -> Path:
        return self.dir / f"{machine_id}.gate"

    def worker_args(self, machine_id: str) -> list[str]:
        """``rundispatch-worker serve`` options that run every flow as the witness flow."""
        command = f"{self.script} {self.file(machine_id)} {machine_id} {self.gate(machine_id)}"
        return ["--command", command]

    def hold(self, machine_id: str) -> None:
        """Long flows that begin on the machine from now on wait until ``release``."""
        self.gate(machine_id).touch()

    def release(self, machine_id: str) -> None:
        self.gate(machine_id).unlink(missing_ok=True)

    def read(self) -> tuple[list[Witnessed], list[str]]:
        """Every witnessed execution, and the lines that do not parse (errors)."""
        seen: list[Witnessed] = []
        bad: list[str] = []
        for path in sorted(self.dir.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split("|")
                try:
                    run_id, fence, machine, at = parts
                    seen.append(Witnessed(run_id, int(fence), machine, float(at)))
                except ValueError:
                    bad.append(f"{path.name}: {line!r}")
        return seen, bad


@dataclass
class Event:
    message_id: str | None
    routing_key: str
    run_id: str
    status: str
    machine_id: str | None
    fence: int | None


@dataclass
class Bystander:
    """A subscriber of the namespace's events: an exclusive queue of its own on ``run.#``."""

    amqp_url: str
    names: Names
    events: list[Event] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    _connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect(self.amqp_url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=2000)
        exchange = await channel.declare_exchange(
            self.names.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, "run.#")
        await queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            record: dict[str, Any] = json.loads(message.body)
            fence = record.get("fence")
            self.events.append(
                Event(
                    message.message_id,
                    event_of(message.routing_key or ""),  # run.<status> of run.<status>.<submitter>
                    str(record["run_id"]),
                    str(record["status"]),
                    record.get("machine_id"),
                    int(fence) if fence is not None else None,
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            self.unreadable.append(f"{message.routing_key}: {exc}: {message.body[:200]!r}")

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def by_run(self) -> dict[str, list[Event]]:
        """Each run's distinct events (a redelivered message, same id, counted once)."""
        runs: dict[str, list[Event]] = defaultdict(list)
        seen: set[tuple[str | None, str, str]] = set()
        for event in self.events:
            key = (event.message_id, event.routing_key, event.run_id)
            if event.message_id is not None and key in seen:
                continue
            seen.add(key)
            runs[event.run_id].append(event)
        return runs

    async def settle(self, run_ids: set[str], terminal: set[str], timeout: float) -> None:
        """Wait (up to ``timeout``) until every run has a terminal event, then a little more
        for late duplicates."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            ended = {
                e.run_id for e in self.events if e.routing_key.removeprefix("run.") in terminal
            }
            if run_ids <= ended:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)


def fsync_dir(path: Path) -> None:
    """Make the witness directory's entries durable (the files fsync themselves)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
