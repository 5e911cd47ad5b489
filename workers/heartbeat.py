"""Liveness: the worker's heartbeat (sessions, running runs, last outcomes, public key), sent
every interval and as soon as the sessions change; after each, beside the next ones (never
holding them up), the flows of runs the dispatcher no longer holds here are stopped."""

from __future__ import annotations

import asyncio
import logging
import time

from dispatcher.crypto import WorkerKeyPair
from dispatcher.logs import fields
from dispatcher.metrics.hooks import WorkerHooks
from dispatcher.models import Heartbeat, RunStatus
from dispatcher.settings import Settings
from workers.ports import DispatcherLink
from workers.runs import WorkerRuns
from workers.sessions import SessionsFile

log = logging.getLogger(__name__)

# A heartbeat's confirm is waited for up to the heartbeat interval, and at least this long.
MIN_CONFIRM_WAIT_S = 1.0


class Heartbeats:
    """Sends the machine's heartbeats; drops abandoned runs."""

    def __init__(
        self,
        *,
        settings: Settings,
        machine_id: str,
        worker_id: str,
        link: DispatcherLink,
        runs: WorkerRuns,
        sessions: SessionsFile,
        keys: WorkerKeyPair,
        capacity: int,
        metrics: WorkerHooks,
    ) -> None:
        self.settings = settings
        self.machine_id = machine_id
        self.worker_id = worker_id
        self.link = link
        self.runs = runs
        self.sessions = sessions
        self.keys = keys
        self.capacity = capacity
        self.metrics = metrics

    async def beat_forever(self) -> None:
        interval = self.settings.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        # The check after a heartbeat asks the dispatcher for its runs' states, a round trip
        # that waits up to the link's reply time-out when an answer is lost (a connection cut
        # under the dispatcher that was answering). It runs beside the heartbeats, one at a
        # time, never before the next one: heartbeats held up behind it for longer than
        # ``offline_after_s`` had the machine declared offline and its running runs failed
        # MachineLost while its flows ran (seen in tests/chaos/test_chaos.py).
        checking: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(min(0.2, interval))
                if self.sessions.changed() or time.monotonic() >= next_beat:
                    await self.send()
                    next_beat = time.monotonic() + interval
                    if checking is None or checking.done():
                        checking = asyncio.create_task(self.drop_abandoned(), name="check-runs")
        finally:
            if checking is not None:
                checking.cancel()

    async def send(self) -> None:
        heartbeat = Heartbeat(
            machine_id=self.machine_id,
            worker_id=self.worker_id,
            sent_at=time.time(),
            sessions=self.sessions.read(),
            running=self.runs.running_refs(),
            finished=tuple(self.runs.finished),
            public_key=self.keys.public_key_b64,
            capacity=self.capacity,
        )
        # Bounded: a confirm that never comes (a cluster node dies with the publish in flight)
        # must not stop the heartbeats; the next one is due by then anyway.
        bound_s = max(self.settings.heartbeat_interval_s, MIN_CONFIRM_WAIT_S)
        try:
            async with asyncio.timeout(bound_s):
                await self.link.heartbeat(heartbeat)
            self.metrics.heartbeat_sent()
        except TimeoutError:
            log.warning("heartbeat not confirmed within %g s; the next one goes on", bound_s)
            self.metrics.heartbeat_failed()
        except Exception as exc:
            log.warning("heartbeat not sent: %s", exc)
            self.metrics.heartbeat_failed()

    async def drop_abandoned(self) -> None:
        """Stop flows whose run the dispatcher no longer has here under our fence (it failed
        the run while this machine was unreachable): the run is over, and it must not keep a
        robot busy."""
        if not self.runs.running:
            return
        items = list(self.runs.running.values())
        try:
            states = await self.link.run_states([item.assignment.run_id for item in items])
        except Exception as exc:
            log.debug("run states not checked: %s", exc)
            return
        for item, state in zip(items, states, strict=True):
            # "dispatched" (to us or under another hand-off) or "queued" is a start, or a claim
            # and a start, the store lost: the dispatcher records the run running here from
            # this worker's heartbeat, so the flow goes on. Running is ours only under our
            # fence on this machine: after lost writes another machine may run it now.
            repaired = state.status in (RunStatus.queued, RunStatus.dispatched)
            ours = repaired or (
                state.fence == item.assignment.fence
                and state.machine_id == self.machine_id
                and state.status is RunStatus.running
            )
            if item.cancel_reason is None and not ours:
                status = state.status.value if state.status else None
                run_id = item.assignment.run_id
                log.warning(
                    "run %s is %s for the dispatcher; stopping its flow here",
                    run_id,
                    status,
                    extra=fields(run_id=run_id),
                )
                self.runs.stop(run_id, f"the dispatcher ended the run ({status})")
