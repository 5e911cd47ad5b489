"""Re-drive: re-submit runs that ended with a status (default ``timed_out``) in a time window,
keeping their priority and order, deduplicated (a run is re-driven once: the new run id is
derived from the old one, so re-driving twice submits nothing new).

A re-driven run is a new request: it goes through the requests queue and intake like any
other, which records it through the lifecycle."""

from __future__ import annotations

from typing import Any, Protocol

from dispatcher.models import Mode, Priority, RunStatus
from dispatcher.usecases.ports import RunReads

REDRIVE_SUFFIX = ".r"


class Submitter(Protocol):
    """Publishes a run request (the Python client)."""

    async def submit(
        self,
        *,
        connection_id: str,
        flow_id: str,
        requested_by: str,
        mode: str | Mode,
        priority: str | Priority = Priority.normal,
        inputs: dict[str, Any] | None = None,
        run_id: str | None = None,
        queue_timeout_s: float | None = None,
        max_run_s: float | None = None,
    ) -> str: ...


def redriven_id(run_id: str) -> str:
    """The id of a run's re-drive: stable, so a second re-drive is a duplicate."""
    return f"{run_id}{REDRIVE_SUFFIX}"[:128]


async def redrive(
    runs: RunReads,
    submitter: Submitter,
    *,
    status: str,
    since: float,
    until: float,
    dry_run: bool,
) -> dict[str, Any]:
    """Re-submit the runs that ended ``status`` between ``since`` and ``until``."""
    wanted = RunStatus(status)
    report: dict[str, Any] = {"submitted": [], "skipped": []}
    run_ids = await runs.finished_since(wanted, since, until)
    ended = [r for r in await runs.get_many(run_ids) if r is not None]
    # Original order: priority first, then when they were queued.
    ended.sort(key=lambda r: (r.priority.value != "high", r.queued_at or r.submitted_at or 0))
    for run in ended:
        new_id = redriven_id(run.run_id)
        if await runs.get(new_id) is not None:
            report["skipped"].append([run.run_id, "already re-driven"])
            continue
        if not dry_run:
            await submitter.submit(
                connection_id=run.connection_id,
                flow_id=run.flow_id,
                requested_by=run.requested_by,
                mode=run.mode,
                priority=run.priority,
                inputs=run.inputs,
                run_id=new_id,
                queue_timeout_s=run.queue_timeout_s,
                max_run_s=run.max_run_s,
            )
        report["submitted"].append([run.run_id, new_id])
    return report
