"""The machine worker: heartbeats, consumes its machine's queue, runs flows, reports back.

    assignment ─▶ refuse if already run ─▶ fenced start (Lua) ─▶ ledger ─▶ ack ─▶ run flow
               ─▶ outcome (Lua, fence-checked) ─▶ ledger ─▶ events

A delivery is acked as soon as the start is recorded: nothing stays unacked while a flow runs.
A run that was started is never started again: after a crash, the run is reported failed
(``WorkerRestarted``) instead.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from dispatcher.adapters.amqp import Ack, Amqp, DeadLetter, Retry, Verdict, retry_for
from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.records import Ending, OutboxMessage, Outcome, error_fragment
from dispatcher.adapters.redis_store import RunStore
from dispatcher.codes import ErrorCode
from dispatcher.crypto import WorkerKeyPair
from dispatcher.metrics import WorkerMetrics
from dispatcher.models import Assignment, FinishedRef, Heartbeat, RunningRef, RunStatus
from dispatcher.ports import Delivery
from dispatcher.settings import Settings
from workers.executors import Executor, FlowContext, FlowResult
from workers.ledger import Ledger
from workers.sessions import SessionsFile

log = logging.getLogger(__name__)

RECENT_OUTCOMES = 50


@dataclass
class Running:
    assignment: Assignment
    task: asyncio.Task[None]
    cancel_reason: str | None = None


class MachineWorker:
    def __init__(
        self,
        *,
        settings: Settings,
        machine_id: str,
        amqp: Amqp,
        runs: RunStore,
        executor: Executor,
        keys: WorkerKeyPair,
        ledger: Ledger,
        sessions: SessionsFile,
        capacity: int = 1,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.machine_id = machine_id
        self.amqp = amqp
        self.runs = runs
        self.executor = executor
        self.keys = keys
        self.ledger = ledger
        self.sessions = sessions
        self.capacity = capacity
        self.metrics = metrics
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.publisher = OutboxPublisher(amqp, runs)
        self.running: dict[str, Running] = {}
        # The last outcomes, reported with every heartbeat (bounded: a few minutes' worth).
        self._finished: collections.deque[FinishedRef] = collections.deque(maxlen=RECENT_OUTCOMES)
        self._endings: asyncio.Queue[tuple[Ending, float, ErrorCode | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.amqp.ensure_machine_queue(self.machine_id)
        await self.reconcile()
        await self.send_heartbeat()
        self._tasks = [
            await self.amqp.consume_batches(
                self.runs.names.machine_queue(self.machine_id),
                self.handle,
                batch_size=20,
                prefetch=50,
            ),
            asyncio.create_task(self.heartbeat_forever(), name="heartbeat"),
            asyncio.create_task(self.report_forever(), name="reporter"),
        ]
        log.info("worker %s serving machine %s", self.worker_id, self.machine_id)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publisher.aclose()

    async def reconcile(self) -> None:
        """At start-up nothing runs here: runs this machine was running were cut short."""
        assigned = await self.runs.redis.hgetall(self.runs.names.machine_assigned(self.machine_id))
        ids = [k.decode() if isinstance(k, bytes) else str(k) for k in assigned]
        for run in await self.runs.get_many(ids):
            if run is None or run.status is not RunStatus.running:
                continue
            log.warning(
                "run %s was running when this worker stopped; reporting it failed", run.run_id
            )
            outcome = await self.runs.finish(
                run.run_id,
                machine_id=self.machine_id,
                fence=run.fence,
                allowed=(RunStatus.running,),
                status=RunStatus.failed,
                now=time.time(),
                error=error_fragment(
                    ErrorCode.WorkerRestarted,
                    "the worker restarted while the flow ran; the run is not started again",
                ),
            )
            if outcome.ok:
                self.ledger.record("abandoned", run.run_id, run.fence or 0)
                await self.publisher.send(outcome.messages)

    # ---- heartbeats ---------------------------------------------------------------------------
    async def heartbeat_forever(self) -> None:
        interval = self.settings.heartbeat_interval_s
        next_beat = time.monotonic() + interval
        while True:
            await asyncio.sleep(min(0.2, interval))
            if self.sessions.changed() or time.monotonic() >= next_beat:
                await self.send_heartbeat()
                await self.drop_abandoned()
                next_beat = time.monotonic() + interval

    async def drop_abandoned(self) -> None:
        """Stop flows whose run the dispatcher no longer has here under our fence (it failed
        the run while this machine was unreachable): the run is over, and it must not keep a
        robot busy."""
        if not self.running:
            return
        items = list(self.running.values())
        try:
            states = await self.runs.states([item.assignment.run_id for item in items])
        except Exception as exc:
            log.debug("run states not checked: %s", exc)
            return
        for item, (status, fence, _machine) in zip(items, states, strict=True):
            # "dispatched" under our fence is a start the store lost: the dispatcher repairs it
            # from this worker's heartbeat, so the flow goes on.
            ours = fence == item.assignment.fence and status in {"running", "dispatched"}
            if item.cancel_reason is None and not ours:
                log.warning(
                    "run %s is %s for the dispatcher; stopping its flow here",
                    item.assignment.run_id,
                    status,
                )
                item.cancel_reason = f"the dispatcher ended the run ({status})"
                item.task.cancel()

    async def send_heartbeat(self) -> None:
        heartbeat = Heartbeat(
            machine_id=self.machine_id,
            worker_id=self.worker_id,
            sent_at=time.time(),
            sessions=self.sessions.read(),
            running=tuple(
                RunningRef(run_id=run_id, fence=item.assignment.fence)
                for run_id, item in self.running.items()
            ),
            finished=tuple(self._finished),
            public_key=self.keys.public_key_b64,
            capacity=self.capacity,
        )
        try:
            await self.amqp.publish_json(
                "heartbeats", "", heartbeat.model_dump_json().encode(), kind="heartbeat"
            )
            if self.metrics is not None:
                self.metrics.heartbeat_sent()
        except Exception as exc:
            log.warning("heartbeat not sent: %s", exc)
            if self.metrics is not None:
                self.metrics.heartbeat_failed()

    # ---- assignments ----------------------------------------------------------------------------
    async def handle(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Start the batch's assignments with one fenced-start round trip and one fsync."""
        verdicts: list[Verdict] = []
        pending: list[tuple[int, Assignment]] = []
        for message in batch:
            if message.type == "cancel":
                verdicts.append(await self._cancel(message.body))
                continue
            verdict, assignment = self._accept(message.body)
            verdicts.append(verdict)
            if assignment is not None:
                pending.append((len(verdicts) - 1, assignment))
        if pending:
            await self._start(pending, verdicts)
        return verdicts

    def _accept(self, body: bytes) -> tuple[Verdict, Assignment | None]:
        try:
            assignment = Assignment.model_validate_json(body)
        except ValidationError as exc:
            return DeadLetter(f"not an assignment: {exc.error_count()} errors", "schema"), None
        if assignment.machine_id != self.machine_id:
            return DeadLetter(f"assignment for machine {assignment.machine_id!r}", "schema"), None
        run_id = assignment.run_id
        if self.ledger.already_ran(run_id) or run_id in self.running:
            log.info("refusing run %s: this worker already ran it", run_id)
            return Ack(), None
        return Ack(), assignment

    async def _start(self, pending: list[tuple[int, Assignment]], verdicts: list[Verdict]) -> None:
        now = time.time()
        grace = self.settings.running_grace_s + 30
        try:
            outcomes = await self.runs.start_many(
                [(a.run_id, a.fence, now + a.time_limit_s + grace) for _, a in pending],
                machine_id=self.machine_id,
                worker_id=self.worker_id,
                now=now,
            )
        except Exception as exc:  # the store is unreachable: RabbitMQ keeps the assignments
            log.warning("could not start %d runs yet: %s", len(pending), exc)
            for index, _ in pending:
                verdicts[index] = retry_for(exc)
            return
        started: list[Assignment] = []
        messages: list[OutboxMessage] = []
        for (index, assignment), outcome in zip(pending, outcomes, strict=True):
            if outcome.ok:
                started.append(assignment)
                messages.extend(outcome.messages)
            elif outcome.result == "error":
                verdicts[index] = Retry(str(outcome.extra))
            else:
                log.info(
                    "refusing run %s (fence %d): %s",
                    assignment.run_id,
                    assignment.fence,
                    outcome.extra,
                )
        self.ledger.record_started(
            [(a.run_id, a.fence, {"machine_id": self.machine_id}) for a in started]
        )
        for assignment in started:
            task = asyncio.create_task(self._execute(assignment), name=f"run:{assignment.run_id}")
            self.running[assignment.run_id] = Running(assignment, task)
        if self.metrics is not None:
            self.metrics.set_running_runs(len(self.running))
        await self.publisher.send(messages)

    async def _cancel(self, body: bytes) -> Verdict:
        try:
            data = json.loads(body)
            run_id = str(data["run_id"])
        except (ValueError, KeyError, TypeError):
            return DeadLetter("not a cancel message", "schema")
        item = self.running.get(run_id)
        if item is not None and item.cancel_reason is None:
            item.cancel_reason = str(data.get("reason") or "cancelled")
            item.task.cancel()
        return Ack()

    async def _execute(self, assignment: Assignment) -> None:
        run_id = assignment.run_id
        started = time.monotonic()
        try:
            result = await self._run_flow(assignment)
        except asyncio.CancelledError:
            item = self.running.get(run_id)
            reason = item.cancel_reason if item else None
            if reason is None:
                raise
            result = FlowResult(False, code=ErrorCode.Cancelled, message=reason)
        status = RunStatus.succeeded if result.succeeded else RunStatus.failed
        if result.code is ErrorCode.Cancelled:
            status = RunStatus.cancelled
        error = (
            ""
            if result.succeeded
            else error_fragment(result.code or ErrorCode.FlowFailed, result.message)
        )
        ending = Ending(
            run_id,
            self.machine_id,
            assignment.fence,
            (RunStatus.running,),
            status,
            error,
            result.outputs or None,
        )
        self._endings.put_nowait((ending, time.monotonic() - started, result.code))

    async def _run_flow(self, assignment: Assignment) -> FlowResult:
        try:
            secret = (
                json.loads(self.keys.open(assignment.sealed_secret, assignment.run_id))
                if assignment.sealed_secret
                else {}
            )
        except Exception:
            return FlowResult(
                False, code=ErrorCode.FlowFailed, message="the sealed secret could not be opened"
            )
        context = FlowContext(
            run_id=assignment.run_id,
            flow_id=assignment.flow_id,
            user=assignment.user,
            inputs=assignment.inputs,
            secret=secret,
        )
        try:
            async with asyncio.timeout(assignment.time_limit_s):  # cheaper than wait_for
                return await self.executor.run(context)
        except TimeoutError:
            return FlowResult(
                False,
                code=ErrorCode.DesktopFlowsActionTimeout,
                message=f"the flow ran longer than {assignment.time_limit_s:g} s and was stopped",
            )

    async def report_forever(self) -> None:
        """Record outcomes in batches: one round trip and one publish window."""
        while True:
            batch = [await self._endings.get()]
            while not self._endings.empty() and len(batch) < 100:
                batch.append(self._endings.get_nowait())
            endings = [ending for ending, _, _ in batch]
            outcomes = await self._finish_with_retry(endings)
            # Outcomes are in the store already; the ledger line is for people (not fsynced).
            self.ledger.record_many(
                "finished",
                [(e.run_id, e.fence or 0, {"status": e.status.value}) for e in endings],
                durable=False,
            )
            messages: list[OutboxMessage] = []
            for (ending, duration, code), outcome in zip(batch, outcomes, strict=True):
                self.running.pop(ending.run_id, None)
                self._finished.append(
                    FinishedRef(
                        run_id=ending.run_id,
                        fence=ending.fence or 0,
                        status=ending.status.value,  # type: ignore[arg-type]
                        code=None if code is None else code.value,
                    )
                )
                if outcome.ok:
                    messages.extend(outcome.messages)
                else:
                    log.warning("outcome of run %s not recorded: %s", ending.run_id, outcome.result)
                if self.metrics is not None:
                    self.metrics.run_executed(
                        ending.status.value, duration, None if code is None else code.value
                    )
            if self.metrics is not None:
                self.metrics.set_running_runs(len(self.running))
            await self.publisher.send(messages)

    async def _finish_with_retry(self, endings: list[Ending]) -> list[Outcome]:
        """Keep trying while the store is unreachable: an outcome is never dropped."""
        delay = 0.2
        while True:
            try:
                return await self.runs.finish_many(endings, time.time())
            except Exception as exc:
                log.warning("could not report %d outcomes yet: %s", len(endings), exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
