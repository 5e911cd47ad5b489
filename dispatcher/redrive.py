"""Re-drive: re-submit runs that ended with a status (default ``timed_out``) in a time window,
keeping their priority and order, deduplicated (a run is re-driven once: the new run id is
derived from the old one, so re-driving twice submits nothing new)."""

from __future__ import annotations

from typing import Any

from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.settings import Settings

REDRIVE_SUFFIX = ".r"


def redriven_id(run_id: str) -> str:
    """The id of a run's re-drive: stable, so a second re-drive is a duplicate."""
    return f"{run_id}{REDRIVE_SUFFIX}"[:128]


async def redrive(
    settings: Settings, *, status: str, since: float, until: float, dry_run: bool
) -> dict[str, Any]:
    """Re-submit the runs that ended ``status`` between ``since`` and ``until``."""
    wanted = RunStatus(status)
    report: dict[str, Any] = {"submitted": [], "skipped": []}
    async with Client.connect(settings) as client:
        run_ids = await client.rt.runs.finished_since(wanted, since, until)
        runs = [r for r in await client.rt.runs.get_many(run_ids) if r is not None]
        # Original order: priority first, then when they were queued.
        runs.sort(key=lambda r: (r.priority.value != "high", r.queued_at or r.submitted_at or 0))
        for run in runs:
            new_id = redriven_id(run.run_id)
            if await client.rt.runs.get(new_id) is not None:
                report["skipped"].append([run.run_id, "already re-driven"])
                continue
            if not dry_run:
                await client.submit(
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
