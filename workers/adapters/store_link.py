"""The worker's link to the dispatcher over the shared run store and RabbitMQ.

Starts and outcomes are run-store transitions recorded through the dispatcher's lifecycle
(the fenced Lua scripts, their events published through the outbox); heartbeats and
assignments travel over RabbitMQ. It is built from the dispatcher's ports, so it imports no
adapter: the worker's composition root (``workers.cli``) hands it the concrete ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from dispatcher.models import Heartbeat, RunStatus
from dispatcher.names import Names
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import BatchHandler, Broker, Ending, MachineState, RunReads, Start
from dispatcher.usecases.results import FinishResult, RunState, StartResult
from workers.ports import Outcome, RunningHere, StartRequest


class StoreLink:
    """``DispatcherLink`` for one machine, over the run store and the broker."""

    def __init__(
        self,
        *,
        machine_id: str,
        worker_id: str,
        names: Names,
        broker: Broker,
        lifecycle: Lifecycle,
        runs: RunReads,
        machines: MachineState,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.machine_id = machine_id
        self.worker_id = worker_id
        self.names = names
        self.broker = broker
        self.lifecycle = lifecycle
        self.runs = runs
        self.machines = machines
        self.clock = clock

    async def lease(self) -> None:
        """In-process: the test world runs one worker per machine."""

    async def lease_lost(self) -> str:
        await asyncio.Event().wait()  # never: nothing else takes the lease in-process
        return ""

    async def receive(
        self, handler: BatchHandler, *, batch_size: int, prefetch: int
    ) -> asyncio.Task[None]:
        await self.broker.ensure_machine_queue(self.machine_id)
        queue = self.names.machine_queue(self.machine_id)
        return await self.broker.consume(queue, handler, batch_size=batch_size, prefetch=prefetch)

    async def stop_receiving(self, timeout_s: float) -> bool:
        return await self.broker.stop_consuming(timeout_s)

    async def start(self, starts: Sequence[StartRequest]) -> list[StartResult]:
        fenced = [
            Start(s.run_id, s.fence, s.deadline, self.machine_id, self.worker_id) for s in starts
        ]
        # The flows start at once; the started events follow (they are in the outbox already).
        async with self.lifecycle.window(wait=False) as window:
            return await window.start_many(fenced, self.clock())

    async def report(self, outcomes: Sequence[Outcome]) -> list[FinishResult]:
        endings = [
            Ending(
                run_id=o.run_id,
                machine_id=self.machine_id,
                fence=o.fence,
                allowed=(RunStatus.running,),
                status=o.status,
                error=o.error,
                outputs=o.outputs,
            )
            for o in outcomes
        ]
        async with self.lifecycle.window() as window:
            return await window.finish_many(endings, self.clock())

    async def heartbeat(self, heartbeat: Heartbeat) -> None:
        body = heartbeat.model_dump_json().encode()
        await self.broker.publish_json("heartbeats", "", body, kind="heartbeat")

    async def run_states(self, run_ids: Sequence[str]) -> list[RunState]:
        return await self.runs.states(run_ids)

    async def running_here(self) -> list[RunningHere]:
        assigned = await self.machines.assigned(self.machine_id)
        runs = await self.runs.get_many([a.run_id for a in assigned])
        return [
            RunningHere(run.run_id, run.fence or 0)
            for run in runs
            if run is not None and run.status is RunStatus.running
        ]

    async def aclose(self) -> None:
        await self.lifecycle.aclose()
