"""The Python client: submit runs, follow them, cancel them, reorder queues.

async with Client.connect(Settings()) as client:
    run_id = await client.submit(connection_id="c1", flow_id="invoice",
                                 requested_by="alice@contoso.com", mode="unattended")
    run = await client.wait(run_id, timeout=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from dispatcher.bootstrap import Runtime, runtime
from dispatcher.core.capacity import CapacityReport
from dispatcher.core.forecast import Prediction
from dispatcher.core.ordering import lane_of, rescore, top_score
from dispatcher.core.placement import reasons_payload
from dispatcher.errors import NotFound, PermanentError
from dispatcher.models import Mode, Priority, Run, RunRequest, RunStatus
from dispatcher.retry import Backoff
from dispatcher.settings import Settings
from dispatcher.usecases.cancel import Canceller
from dispatcher.usecases.foresight import Foresight
from dispatcher.usecases.results import Reordered


@dataclass(frozen=True)
class QueueEntry:
    """A queued run as ``queue show`` and ``runs show`` present it."""

    target: str
    position: int
    run_id: str
    priority: str
    mode: str
    connection_id: str
    waited_s: float
    queue_deadline: float | None
    reasons: dict[str, str]
    # The forecast (docs/forecast.md): when it is likely to start (Unix time; None when it
    # is predicted to time out, no machine can take it, or it is too deep to play forward),
    # the outlook (starts | times_out | no_machine | unknown) and how sure it is.
    predicted_start_at: float | None = None
    outlook: str = "unknown"
    confidence: str | None = None
    no_machine_reasons: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["predicted_start_at"] = iso_or_none(self.predicted_start_at)
        return data

    @property
    def forecast_text(self) -> str:
        """The forecast in words, for ``runs show`` and ``queue show``."""
        if self.outlook == "starts":
            return f"starts ~{iso_or_none(self.predicted_start_at)} ({self.confidence})"
        if self.outlook == "times_out":
            return f"predicted to time out ({self.confidence})"
        if self.outlook == "no_machine":
            return "no machine can take it"
        return "no forecast (deeper than the forecast plays the queue)"


def iso_or_none(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# Polling a run's record while waiting for it: quickly at first, then every half second.
WAIT_POLL = Backoff(first_s=0.05, factor=1.5, max_s=0.5)


class Client:
    """Submits runs over AMQP; reads and steers them in the store (a tool: it builds its own
    adapters and use cases)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.foresight: Foresight = rt.foresight()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: Settings) -> AsyncIterator[Client]:
        async with runtime(settings) as rt:
            yield cls(rt)

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
        fail_early: bool = False,
    ) -> str:
        """Publish a run request (persistent, confirmed); returns its run id."""
        body: dict[str, Any] = {
            "run_id": run_id or uuid.uuid4().hex,
            "flow_id": flow_id,
            "connection_id": connection_id,
            "requested_by": requested_by,
            "mode": str(Mode(mode).value),
            "priority": str(Priority(priority).value),
            "inputs": inputs or {},
            "submitted_at": time.time(),
        }
        if queue_timeout_s is not None:
            body["queue_timeout_s"] = queue_timeout_s
        if max_run_s is not None:
            body["max_run_s"] = max_run_s
        if fail_early:
            body["fail_early"] = True
        raw = json.dumps(body).encode()
        RunRequest.model_validate_json(raw)  # fail here, not in the dead-letter queue
        await self.rt.amqp.publish_json("requests", "submit", raw, kind="run.request")
        return str(body["run_id"])

    async def get(self, run_id: str) -> Run:
        """The run's record with its timeline; NotFound if the dispatcher never recorded it."""
        run = await self.rt.runs.get(run_id)
        if run is None:
            raise NotFound(f"run {run_id!r} does not exist (yet)")
        return run

    async def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """Wait until the run is terminal; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for delay in WAIT_POLL.delays():
            run = await self.rt.runs.get(run_id)
            if run is not None and run.status.terminal:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                status = run.status.value if run else "not recorded"
                raise TimeoutError(f"run {run_id} is still {status} after {timeout} s")
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the delays never end")

    async def cancel(self, run_id: str, reason: str = "cancelled by request") -> Run:
        """Cancel a queued or dispatched run at once; ask the worker to stop a running one."""
        lifecycle = self.rt.lifecycle()
        try:
            return await Canceller(runs=self.rt.runs, lifecycle=lifecycle).cancel(run_id, reason)
        finally:
            await lifecycle.aclose()

    async def set_priority(self, run_id: str, priority: str | Priority) -> Run:
        """Change a queued run's priority (its position follows)."""
        run = await self._queued(run_id)
        new = Priority(priority)
        score = await self.rt.runs.score_of(run_id) or time.time()
        return await self._reorder(
            run,
            score=rescore(score, run.priority, new, self.settings.priority_boost_s),
            priority=new,
            event="priority_changed",
        )

    async def move_to_top(self, run_id: str) -> Run:
        """Put a queued run ahead of every run of its target's queue."""
        run = await self._queued(run_id)
        head = await self.rt.runs.queue_page(run.target or "", 0, 0)
        score = top_score(head[0][1] if head else None, time.time())
        return await self._reorder(run, score=score, priority=run.priority, event="moved_to_top")

    async def _queued(self, run_id: str) -> Run:
        run = await self.get(run_id)
        if run.status is not RunStatus.queued:
            raise PermanentError(f"run {run_id} is {run.status.value}, not queued")
        return run

    async def _reorder(self, run: Run, *, score: float, priority: Priority, event: str) -> Run:
        lifecycle = self.rt.lifecycle()
        try:
            async with lifecycle.window() as window:
                result = await window.reorder(
                    run, score=score, priority=priority, event=event, now=time.time()
                )
        finally:
            await lifecycle.aclose()
        if not isinstance(result, Reordered):
            raise PermanentError(f"run {run.run_id} left the queue meanwhile")
        # A hint for the replicas: the queue's order changed, a placement pass may differ.
        await self.rt.amqp.publish_json(
            "events", "machine.changed", b"{}", kind="machine.changed", mandatory=False
        )
        return await self.get(run.run_id)

    async def explain(self, run: Run) -> QueueEntry | None:
        """Position and per-machine reasons of a queued run (None when not queued)."""
        if run.status is not RunStatus.queued:
            return None
        position = await self.rt.runs.position(run) or 0
        lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
        reasons = reasons_payload(await self.rt.runs.lane_reasons(run.target or "", lane))
        entry = self._entry(run, position, reasons, time.time())
        return _predicted(entry, await self.foresight.predict(run))

    async def predict(self, run_id: str) -> Prediction | None:
        """The forecast of a queued run: ``start_at``, ``outlook``, ``confidence`` (None: not
        queued, or deeper in its queue than the forecast plays it)."""
        return await self.foresight.predict(await self.get(run_id))

    async def capacity(
        self, target: str, *, add_machines: int = 0, since: float | None = None
    ) -> CapacityReport:
        """Replay the target's recorded runs since ``since`` (default: the last 24 h) on
        today's fleet and with ``add_machines`` more (or fewer) machines."""
        start = time.time() - 86400 if since is None else since
        return await self.foresight.capacity(target, add_machines, start)

    def _entry(self, run: Run, position: int, reasons: dict[str, str], now: float) -> QueueEntry:
        return QueueEntry(
            target=run.target or "",
            position=position,
            run_id=run.run_id,
            priority=run.priority.value,
            mode=run.mode.value,
            connection_id=run.connection_id,
            waited_s=round(now - (run.queued_at or now), 3),
            queue_deadline=run.queue_deadline,
            reasons=reasons,
        )

    async def queue(self, target: str | None = None, limit: int = 100) -> list[QueueEntry]:
        """Queued runs per target, in dispatch order (at most ``limit`` per target)."""
        targets = [target] if target else await self.rt.runs.targets()
        entries: list[QueueEntry] = []
        now = time.time()  # one instant for the whole listing: waits compare across entries
        for key in targets:
            page = await self.rt.runs.queue_page(key, 0, limit - 1)
            runs = await self.rt.runs.get_many([run_id for run_id, _ in page])
            forecast = await self.foresight.forecast(key)
            predictions = {p.run_id: p for p in forecast.predictions}
            reasons_cache: dict[str, dict[str, str]] = {}
            for position, run in enumerate(runs, start=1):
                if run is None:
                    continue
                lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
                if lane not in reasons_cache:
                    reasons_cache[lane] = reasons_payload(
                        await self.rt.runs.lane_reasons(key, lane)
                    )
                entry = self._entry(run, position, reasons_cache[lane], now)
                entries.append(_predicted(entry, predictions.get(run.run_id)))
        return entries


def _predicted(entry: QueueEntry, prediction: Prediction | None) -> QueueEntry:
    if prediction is None:
        return entry
    return replace(
        entry,
        predicted_start_at=prediction.start_at,
        outlook=prediction.outlook.value,
        confidence=prediction.confidence.value,
        no_machine_reasons={m: code.value for m, code in prediction.reasons.items()} or None,
    )
