"""Placement: put queued runs of a target on machines that can take them.

A pass looks at the head run of each lane of the target (runs that share connection, mode and
priority are eligible for exactly the same machines), in queue order. A head that cannot be
placed is skipped, so it never blocks the lanes behind it; its reasons are recorded per
machine. Cost: lanes x machines of the target, independent of the backlog and of the fleet.
Passes are requested by events (a run queued, a slot freed, a heartbeat that changed a
machine) and coalesced per target.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from dispatcher.adapters.fleet_store import FleetStore
from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.redis_store import (
    MachineStore,
    Outcome,
    QueuedHead,
    RunStore,
    error_fragment,
    fragment,
)
from dispatcher.codes import ErrorCode
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.selection import Selection, select_machine, slots_of
from dispatcher.errors import RetryableRunError, RunFailure
from dispatcher.handoff import Handoff
from dispatcher.metrics_hooks import MetricsHooks
from dispatcher.models import AssignedRun, MachineView, Mode, RunStatus
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0


class Placer:
    """Runs coalesced placement passes, one at a time per target in this process."""

    def __init__(
        self,
        *,
        settings: Settings,
        fleet: FleetStore,
        runs: RunStore,
        machines: MachineStore,
        publisher: OutboxPublisher,
        handoff: Handoff,
        metrics: MetricsHooks,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.runs = runs
        self.machines = machines
        self.publisher = publisher
        self.handoff = handoff
        self.metrics = metrics
        self.clock = clock
        self._pending: set[str] = set()
        self._wakeup = asyncio.Event()
        self._retry_handles: dict[str, asyncio.TimerHandle] = {}

    def request(self, *targets: str) -> None:
        """Ask for a pass over each target (coalesced with passes already asked for)."""
        if targets:
            self._pending.update(targets)
            self._wakeup.set()

    def request_later(self, target: str, delay_s: float) -> None:
        if target in self._retry_handles:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retry_handles.pop(target, None)
            self.request(target)

        self._retry_handles[target] = loop.call_later(delay_s, fire)

    async def run_forever(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            targets, self._pending = self._pending, set()
            for target in sorted(targets):
                try:
                    await self.place(target)
                except Exception:
                    log.exception("placement pass for %s failed; retrying soon", target)
                    self.request_later(target, RETRY_AFTER_S)

    async def place(self, target: str) -> int:
        """One pass over ``target``; returns how many runs were handed to machines."""
        started = time.perf_counter()
        fleet = await self.fleet.load()
        heads = await self.runs.lane_heads(target)
        if not heads:
            return 0
        now = self.clock()
        machine_ids = fleet.machine_ids_of_key(target)
        views = {
            view.machine_id: view
            for view in await self.machines.views(
                [fleet.machines[m] for m in machine_ids], now, self.settings.offline_after_s
            )
        }
        heapq.heapify(heap := [(h.score, h.run_id, h) for h in heads])
        placed = 0
        while heap:
            _, _, head = heapq.heappop(heap)
            result = await self._place_head(fleet, target, head, views, now)
            if result == "placed":
                placed += 1
            if result in {"placed", "gone", "failed"}:
                following = await self.runs.next_in_lane(target, head.lane)
                if following is not None:
                    heapq.heappush(heap, (following.score, following.run_id, following))
        self.metrics.decision_latency(time.perf_counter() - started)
        return placed

    async def _place_head(
        self,
        fleet: FleetSnapshot,
        target: str,
        head: QueuedHead,
        views: dict[str, MachineView],
        now: float,
    ) -> str:
        connection = fleet.connections.get(head.connection_id)
        if connection is None:
            return "waiting"
        mode = Mode(head.mode)
        for _attempt in range(3):
            selection = select_machine(views.values(), connection, mode)
            if selection.machine_id is None:
                await self._record_reasons(target, head, selection, views, now)
                return "waiting"
            view = views[selection.machine_id]
            heartbeat = await self.machines.heartbeat(view.machine_id)
            public_key = heartbeat.public_key if heartbeat else None
            try:
                sealed = await self.handoff.sealed_secret(connection, head.run_id, public_key or "")
            except RunFailure as failure:
                await self._fail_queued(head, failure, now)
                return "failed"
            except RetryableRunError as error:
                reasons = dict(selection.reasons)
                reasons[view.machine_id] = error.code
                await self._record_reasons(target, head, Selection(None, reasons), views, now)
                self.request_later(target, RETRY_AFTER_S)
                return "waiting"
            assignment_head = ",".join(
                f'"{key}":{fragment(value)}'
                for key, value in (
                    ("machine_id", view.machine_id),
                    ("mode", mode.value),
                    ("user", connection.session_user),
                    ("connection_kind", connection.kind.value),
                    ("max_run_s", self.settings.max_run_s),
                    ("sealed_secret", sealed),
                )
            )
            outcome = await self.runs.claim(
                head,
                target,
                machine_id=view.machine_id,
                user=connection.session_user,
                slots=slots_of(view),
                assignment_head=assignment_head,
                now=now,
            )
            if outcome.ok:
                fence = int(outcome.extra[0])
                views[view.machine_id] = view.model_copy(
                    update={
                        "assigned": (
                            *view.assigned,
                            AssignedRun(
                                run_id=head.run_id,
                                mode=mode,
                                user=connection.session_user.casefold(),
                                fence=fence,
                            ),
                        )
                    }
                )
                await self.publisher.send(outcome.messages)
                self._observe_dispatch(target, connection.kind.value, mode.value, outcome, now)
                return "placed"
            if outcome.result == "not_queued":
                return "gone"
            # Another replica filled the machine meanwhile: look again with fresh state.
            fresh = await self.machines.views([view.machine], now, self.settings.offline_after_s)
            views[view.machine_id] = fresh[0]
        return "waiting"

    async def _record_reasons(
        self,
        target: str,
        head: QueuedHead,
        selection: Selection,
        views: dict[str, MachineView],
        now: float,
    ) -> None:
        reasons: dict[str, str] = {}
        for machine_id, code in selection.reasons.items():
            view = views.get(machine_id)
            if code is ErrorCode.MachineOffline and view is not None:
                since = view.offline_since
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)) if since else None
                reasons[machine_id] = (
                    f"MachineOffline since {stamp}" if stamp else "MachineOffline (never seen)"
                )
            else:
                reasons[machine_id] = code.value
        if await self.runs.set_lane_reasons(target, head.lane, reasons, now):
            await self.runs.note(head.run_id, "waiting", now, {"reasons": reasons})

    async def _fail_queued(self, head: QueuedHead, failure: RunFailure, now: float) -> None:
        run = await self.runs.get(head.run_id)
        if run is None:
            return
        outcome = await self.runs.unqueue(
            run,
            status=RunStatus.failed,
            error=error_fragment(failure.code, failure.message, failure.detail),
            now=now,
            due_only=False,
            detail={"code": failure.code.value},
        )
        if outcome.ok:
            await self.publisher.send(outcome.messages)

    def _observe_dispatch(
        self, target: str, kind: str, mode: str, outcome: Outcome, now: float
    ) -> None:
        self.metrics.run_dispatched(target, kind, mode)
        record = json.loads(outcome.messages[0].body)
        submitted = record.get("submitted_at") or record.get("queued_at") or now
        self.metrics.queue_wait(max(0.0, now - float(submitted)), target, kind)


def reasons_payload(raw: dict[str, Any] | None) -> dict[str, str]:
    """The per-machine reasons stored for a lane (empty when none were recorded)."""
    if not raw:
        return {}
    machines = raw.get("machines") or {}
    return {str(k): str(v) for k, v in machines.items()}
