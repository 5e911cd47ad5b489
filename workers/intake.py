"""The worker's intake: assignments and cancels from its machine's queue.

    assignment ─▶ refuse if already run ─▶ fenced start (batch) ─▶ ledger (fsync) ─▶ flow
                                                                 └▶ verdicts: ack at once

A delivery is acked as soon as the start is recorded: nothing stays unacked while a flow runs.
A run that was started is never started again (the ledger refuses it, and so does the
dispatcher side's fence).

The sealed secret is opened before the start, with the binding computed from the assignment as
received (run, machine, fence, flow, inputs digest). An assignment whose secret does not open
(a swapped flow or inputs, another machine's or run's secret) is refused: its flow never runs,
the run is started and reported ``failed`` (``FlowFailed``, the reason in its error) so that it
does not hang, and the delivery is dead-lettered with the reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from dispatcher.errors import SealedDataError
from dispatcher.logs import fields
from dispatcher.metrics.hooks import WorkerHooks
from dispatcher.models import Assignment
from dispatcher.settings import Settings
from dispatcher.usecases.ports import Ack, DeadLetter, Delivery, Retry, Verdict, retry_for
from dispatcher.usecases.results import Failed, Refused, Started
from workers.ledger import Ledger
from workers.ports import DispatcherLink, StartRequest
from workers.runner import Runner
from workers.runs import WorkerRuns

log = logging.getLogger(__name__)

# An assignment's opened secret, or why it was refused.
Opened = dict[str, Any] | str


class AssignmentIntake:
    """Handles batches of the machine's queue."""

    def __init__(
        self,
        *,
        settings: Settings,
        machine_id: str,
        link: DispatcherLink,
        ledger: Ledger,
        runs: WorkerRuns,
        runner: Runner,
        metrics: WorkerHooks,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.machine_id = machine_id
        self.link = link
        self.ledger = ledger
        self.runs = runs
        self.runner = runner
        self.metrics = metrics
        self.clock = clock

    async def handle(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Start the batch's assignments with one fenced-start round trip and one fsync."""
        verdicts: list[Verdict] = []
        pending: list[tuple[int, Assignment, Opened]] = []
        for message in batch:
            if message.type == "cancel":
                verdicts.append(self._cancel(message.body))
                continue
            verdict, assignment = self._accept(message.body)
            verdicts.append(verdict)
            if assignment is not None and any(
                (a.run_id, a.fence) == (assignment.run_id, assignment.fence) for _, a, _ in pending
            ):
                # The same assignment twice in a batch (a redelivery): start it once. Another
                # fence of the run is another hand-off (the old one waited in the queue while the
                # run was handed off again): both are asked, only the current one starts.
                continue
            if assignment is not None:
                pending.append((len(verdicts) - 1, assignment, self._open(assignment)))
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
        if self.ledger.already_ran(run_id) or run_id in self.runs.running:
            log.info(
                "refusing run %s: this worker already ran it", run_id, extra=fields(run_id=run_id)
            )
            return Ack(), None
        return Ack(), assignment

    def _open(self, assignment: Assignment) -> Opened:
        try:
            return self.runner.open_secret(assignment)
        except (SealedDataError, ValueError):
            reason = (
                f"refused run {assignment.run_id}: its sealed secret does not open for this "
                "assignment (run, machine, fence, flow and inputs must be those it was sealed for)"
            )
            log.warning("%s", reason)
            return reason

    async def _start(
        self, pending: list[tuple[int, Assignment, Opened]], verdicts: list[Verdict]
    ) -> None:
        now = self.clock()
        grace = self.settings.running_grace_s + 30
        starts = [
            StartRequest(a.run_id, a.fence, now + a.time_limit_s + grace) for _, a, _ in pending
        ]
        try:
            results = await self.link.start(starts)
        except Exception as exc:  # the dispatcher side is unreachable: RabbitMQ keeps them
            log.warning("could not start %d runs yet: %s", len(pending), exc)
            for index, _, _ in pending:
                verdicts[index] = retry_for(exc)
            return
        started: list[tuple[Assignment, Opened]] = []
        for (index, assignment, opened), result in zip(pending, results, strict=True):
            if isinstance(opened, str):
                verdicts[index] = DeadLetter(opened, "handoff")
            match result:
                case Started():
                    started.append((assignment, opened))
                case Failed(error=error):
                    verdicts[index] = Retry(error)
                case Refused(status=status, fence=fence):
                    log.info(
                        "refusing run %s (fence %d): it is %s under fence %s",
                        assignment.run_id,
                        assignment.fence,
                        status.value if status else "unknown",
                        fence,
                        extra=fields(run_id=assignment.run_id),
                    )
        self.ledger.record_started(
            [(a.run_id, a.fence, {"machine_id": self.machine_id}) for a, _ in started]
        )
        for assignment, opened in started:
            if isinstance(opened, str):
                self.runner.refuse(assignment, opened)
            else:
                self.runner.launch(assignment, opened)
        self.metrics.set_running_runs(len(self.runs.running))

    def _cancel(self, body: bytes) -> Verdict:
        try:
            data = json.loads(body)
            run_id = str(data["run_id"])
        except (ValueError, KeyError, TypeError):
            return DeadLetter("not a cancel message", "schema")
        self.runs.stop(run_id, str(data.get("reason") or "cancelled"))
        return Ack()
