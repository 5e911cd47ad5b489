"""The machine worker: heartbeats, consumes its machine's queue, runs flows, reports back.

    assignment ─▶ refuse if already run ─▶ fenced start ─▶ ledger ─▶ ack ─▶ run flow
               ─▶ outcome (fence-checked) ─▶ ledger ─▶ events

``MachineWorker`` composes four jobs that share :class:`~workers.runs.WorkerRuns`: the
intake (``workers.intake``), the runner (``workers.runner``), the reporter
(``workers.reporter``) and the heartbeats (``workers.heartbeat``). Everything it asks of the
dispatcher side goes through one port, ``workers.ports.DispatcherLink``.

A run that was started is never started again: after a crash, the run is reported failed
(``WorkerRestarted``) instead.

One live worker per machine: a worker takes the machine's lease (``DispatcherLink.lease``)
before anything else, so a second worker started for the same machine stops there
(``InExclusiveUse``) instead of reporting the first one's running runs as cut short.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dispatcher.codes import ErrorCode
from dispatcher.crypto import WorkerKeyPair
from dispatcher.errors import InExclusiveUse, Unavailable
from dispatcher.logs import fields
from dispatcher.metrics.hooks import NullWorkerMetrics, WorkerHooks
from dispatcher.models import RunError, RunStatus
from dispatcher.retry import Backoff, retry
from dispatcher.settings import Settings
from dispatcher.usecases.results import Finished
from workers.executors import Executor
from workers.heartbeat import Heartbeats
from workers.intake import AssignmentIntake
from workers.ledger import Ledger
from workers.ports import DispatcherLink, Outcome
from workers.reporter import Reporter
from workers.runner import Runner
from workers.runs import WorkerRuns
from workers.sessions import SessionsFile

log = logging.getLogger(__name__)

ASSIGNMENT_BATCH = 20
ASSIGNMENT_PREFETCH = 50
# A worker starting while RabbitMQ or Redis restarts waits for them this long.
START_WAIT_S = 120.0
START_BACKOFF = Backoff(first_s=0.2, max_s=2.0)
T = TypeVar("T")


def new_worker_id() -> str:
    """An id for this worker process (host, pid, random)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class MachineWorker:
    """The worker of one machine, built from its jobs."""

    def __init__(
        self,
        *,
        settings: Settings,
        machine_id: str,
        link: DispatcherLink,
        executor: Executor,
        keys: WorkerKeyPair,
        ledger: Ledger,
        sessions: SessionsFile,
        capacity: int = 1,
        metrics: WorkerHooks | None = None,
        worker_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.machine_id = machine_id
        self.link = link
        self.ledger = ledger
        self.worker_id = worker_id or new_worker_id()
        self.metrics: WorkerHooks = metrics or NullWorkerMetrics()
        self.runs = WorkerRuns()
        self.runner = Runner(
            executor=executor,
            keys=keys,
            runs=self.runs,
            metrics=self.metrics,
            max_output_bytes=settings.max_output_bytes,
        )
        self.intake = AssignmentIntake(
            settings=settings,
            machine_id=machine_id,
            link=link,
            ledger=ledger,
            runs=self.runs,
            runner=self.runner,
            metrics=self.metrics,
            clock=clock,
        )
        self.reporter = Reporter(
            link=link, ledger=ledger, runs=self.runs, runner=self.runner, metrics=self.metrics
        )
        self.heartbeats = Heartbeats(
            settings=settings,
            machine_id=machine_id,
            worker_id=self.worker_id,
            link=link,
            runs=self.runs,
            sessions=sessions,
            keys=keys,
            capacity=capacity,
            metrics=self.metrics,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False

    async def start(self) -> None:
        """Report runs cut short, heartbeat, consume the machine's queue. A connection that
        breaks meanwhile (RabbitMQ or Redis restarting) is waited for, up to START_WAIT_S."""

        def waiting(exc: BaseException, delay: float) -> None:
            log.warning("cannot start yet, retrying in %.1f s: %s", delay, exc)

        async def when_available(step: Callable[[], Awaitable[T]]) -> T:
            deadline = time.monotonic() + START_WAIT_S
            return await retry(
                step,
                retry_on=Unavailable,
                backoff=START_BACKOFF,
                deadline=deadline,
                on_retry=waiting,
            )

        async def lease() -> None:
            try:
                await self.link.lease()
            except Unavailable:
                # No queues yet (the dispatcher declares them at the machine's first
                # heartbeat), so no worker holds the lease either: heartbeat, then try again.
                await self.heartbeats.send()
                raise
            except InExclusiveUse as exc:
                raise InExclusiveUse(
                    f"another worker already serves machine {self.machine_id} (it holds the "
                    f"machine's lease: {exc}); stop it first, or give this one another machine"
                ) from exc

        # The lease first: a second worker stops here, before its heartbeat or its reconcile
        # could touch the runs of the worker that serves the machine.
        await when_available(lease)
        await self.heartbeats.send()
        await when_available(self.reconcile)
        receive = functools.partial(
            self.link.receive,
            self.intake.handle,
            batch_size=ASSIGNMENT_BATCH,
            prefetch=ASSIGNMENT_PREFETCH,
        )
        self._tasks = [
            await when_available(receive),
            asyncio.create_task(self.heartbeats.beat_forever(), name="heartbeat"),
            asyncio.create_task(self.reporter.report_forever(), name="reporter"),
        ]
        log.info("worker %s serving machine %s", self.worker_id, self.machine_id)

    async def drain(self, grace_s: float, timeout_s: float) -> None:
        """A graceful stop: take no more assignments, let the running flows finish for up to
        ``grace_s``, stop those still running (``WorkerStopped``), report every outcome
        (for up to ``timeout_s`` more), then stop."""
        self.draining = True
        log.info("stopping: no new assignments; %d flows running", len(self.runs.running))
        await self.link.stop_receiving(timeout_s)
        tasks = [item.task for item in self.runs.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        for run_id, item in list(self.runs.running.items()):
            if not item.task.done():
                log.warning(
                    "run %s outlasted the grace of %g s; stopping it",
                    run_id,
                    grace_s,
                    extra=fields(run_id=run_id),
                )
                self.runs.stop(
                    run_id,
                    f"the worker stopped and the flow outlasted the grace of {grace_s:g} s",
                    ErrorCode.WorkerStopped,
                )
        deadline = time.monotonic() + timeout_s
        # The reporter forgets a run once its outcome is recorded.
        while self.runs.running and time.monotonic() < deadline:  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.05)
        if self.runs.running:
            log.warning("%d outcomes not reported before stopping", len(self.runs.running))
        await self.stop()

    async def give_up(self, reason: str) -> None:
        """Another worker serves the machine now (it took the lease while this one was
        disconnected, and reported this one's runs as cut short): stop every flow at once,
        report nothing, stop."""
        self.draining = True
        log.error("%s; stopping %d flows and this worker", reason, len(self.runs.running))
        for run_id in list(self.runs.running):
            self.runs.stop(run_id, reason, ErrorCode.WorkerStopped)
        await self.stop()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.link.aclose()

    def consuming(self) -> bool:
        """Whether its jobs run (readiness): false once stopping or when one ended."""
        return bool(self._tasks) and not self.draining and not any(t.done() for t in self._tasks)

    async def reconcile(self) -> None:
        """At start-up nothing runs here: runs this machine was running were cut short."""
        cut_short = await self.link.running_here()
        if not cut_short:
            return
        for run in cut_short:
            log.warning(
                "run %s was running when this worker stopped; reporting it failed",
                run.run_id,
                extra=fields(run_id=run.run_id),
            )
        error = RunError(
            code=ErrorCode.WorkerRestarted,
            message="the worker restarted while the flow ran; the run is not started again",
        )
        outcomes = [Outcome(r.run_id, r.fence, RunStatus.failed, error) for r in cut_short]
        results = await self.link.report(outcomes)
        for outcome, result in zip(outcomes, results, strict=True):
            if isinstance(result, Finished):
                self.ledger.record("abandoned", outcome.run_id, outcome.fence)
