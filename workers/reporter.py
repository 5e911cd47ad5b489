"""Reporting outcomes: in batches (one round trip, one publish window), retried while the
dispatcher side cannot be reached, so that an outcome is never dropped."""

from __future__ import annotations

import logging

from dispatcher.logs import fields
from dispatcher.metrics.hooks import WorkerHooks
from dispatcher.models import FinishedRef
from dispatcher.retry import Backoff, retry
from dispatcher.usecases.results import Finished, FinishResult
from workers.ledger import Ledger
from workers.ports import DispatcherLink
from workers.runner import Executed, Runner
from workers.runs import WorkerRuns

log = logging.getLogger(__name__)

REPORT_BATCH = 100
REPORT_BACKOFF = Backoff(first_s=0.2, max_s=5.0)


class Reporter:
    """Takes outcomes from the runner and reports them."""

    def __init__(
        self,
        *,
        link: DispatcherLink,
        ledger: Ledger,
        runs: WorkerRuns,
        runner: Runner,
        metrics: WorkerHooks,
    ) -> None:
        self.link = link
        self.ledger = ledger
        self.runs = runs
        self.runner = runner
        self.metrics = metrics

    async def report_forever(self) -> None:
        done = self.runner.done
        while True:
            batch = [await done.get()]
            while not done.empty() and len(batch) < REPORT_BATCH:
                batch.append(done.get_nowait())
            await self.report(batch)

    async def report(self, batch: list[Executed]) -> list[FinishResult]:
        """Record a batch of outcomes (retrying until it is), then forget the runs here."""
        outcomes = [executed.outcome for executed in batch]

        def waiting(exc: BaseException, delay: float) -> None:
            log.warning("could not report %d outcomes yet: %s", len(outcomes), exc)

        results = await retry(
            lambda: self.link.report(outcomes),
            retry_on=Exception,
            backoff=REPORT_BACKOFF,
            on_retry=waiting,
        )
        # Outcomes are recorded already; the ledger line is for people (not fsynced).
        self.ledger.record_many(
            "finished",
            [(o.run_id, o.fence, {"status": o.status.value}) for o in outcomes],
            durable=False,
        )
        for executed, result in zip(batch, results, strict=True):
            outcome, code = executed.outcome, executed.code
            self.runs.running.pop(outcome.run_id, None)
            self.runs.finished.append(
                FinishedRef(
                    run_id=outcome.run_id,
                    fence=outcome.fence,
                    status=outcome.status.value,  # type: ignore[arg-type]
                    code=None if code is None else code.value,
                )
            )
            if not isinstance(result, Finished):
                log.warning(
                    "outcome of run %s not recorded: %r",
                    outcome.run_id,
                    result,
                    extra=fields(run_id=outcome.run_id),
                )
            self.metrics.run_executed(
                outcome.status.value, executed.duration_s, None if code is None else code.value
            )
        self.metrics.set_running_runs(len(self.runs.running))
        return results
