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
from dataclasses import dataclass
from typing import Any

from dispatcher.adapters.fleet_store import FleetStore
from dispatcher.adapters.machine_store import MachineStore
from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.records import (
    ClaimPlan,
    OutboxMessage,
    Outcome,
    QueuedHead,
    error_fragment,
    fragment,
)
from dispatcher.adapters.redis_store import RunStore
from dispatcher.codes import ErrorCode
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.selection import Selection, placement_room, select_machine, slots_of
from dispatcher.errors import RetryableRunError, RunFailure
from dispatcher.handoff import Handoff
from dispatcher.metrics_hooks import MetricsHooks
from dispatcher.models import AssignedRun, Connection, MachineView, Mode, RunStatus
from dispatcher.settings import Settings

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
PREFETCH_PER_LANE = 50
MAX_CLAIMS_PER_PASS = 200
# Why-waiting reasons: unchanged ones are checked against the store at most every
# REASONS_RECHECK_S, and a lane's reasons change at most every REASONS_MIN_INTERVAL_S (when
# machines fill and free up quickly, heads wait for milliseconds and their reasons flip with
# every pass; the last ones are still recorded, by a pass asked for when the interval ends).
REASONS_RECHECK_S = 5.0
REASONS_MIN_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Planned:
    """A lane head the pass decided to place on ``view``'s machine."""

    head: QueuedHead
    connection: Connection
    view: MachineView


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
        self._reasons_seen: dict[tuple[str, str], tuple[dict[str, str], float]] = {}

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
        """One pass over ``target``; returns how many runs were handed to machines.

        Decisions are made on a local copy of the machines' state (each placement is applied
        to it), then their claims run in one round trip and their messages are published as
        one confirmed window. A claim that loses a race (another replica filled the machine)
        just asks for another pass.
        """
        started = time.perf_counter()
        fleet = await self.fleet.load()
        lane_names = await self.runs.lane_names(target)
        if not lane_names:
            return 0
        now = self.clock()
        machine_ids = fleet.machine_ids_of_key(target)
        views = {
            view.machine_id: view
            for view in await self.machines.views(
                [fleet.machines[m] for m in machine_ids], now, self.settings.offline_after_s
            )
        }
        # Read no more runs of a lane than the pass could place, at least the head (whose
        # reasons are recorded when it waits).
        per_lane = max(1, min(PREFETCH_PER_LANE, placement_room(views.values())))
        lanes = await self.runs.lane_members(target, lane_names, per_lane)
        if not lanes:
            return 0
        plans, waiting, again = self._decide(fleet, target, lanes, views, now, per_lane=per_lane)
        placed, lost_races, failed = await self._claim(target, plans, waiting, now)
        await self.runs.record_reasons(target, self._reasons_due(target, waiting, now), now)
        self.metrics.decision_latency(time.perf_counter() - started)
        # A run failed at hand-off left its lane: the run behind it is the new head.
        if again or lost_races or failed:
            self.request(target)
        return placed

    def _reasons_due(
        self, target: str, waiting: dict[str, tuple[str, dict[str, str]]], now: float
    ) -> dict[str, tuple[str, dict[str, str]]]:
        """The waiting lanes whose reasons are worth comparing with the store now."""
        due: dict[str, tuple[str, dict[str, str]]] = {}
        deferred = False
        for lane, (run_id, reasons) in waiting.items():
            seen = self._reasons_seen.get((target, lane))
            if seen is not None:
                age = now - seen[1]
                if seen[0] == reasons and age < REASONS_RECHECK_S:
                    continue
                if seen[0] != reasons and age < REASONS_MIN_INTERVAL_S:
                    deferred = True
                    continue
            due[lane] = (run_id, reasons)
        if len(self._reasons_seen) > 10_000:
            self._reasons_seen.clear()
        for lane, (_, reasons) in due.items():
            self._reasons_seen[(target, lane)] = (reasons, now)
        if deferred:
            self.request_later(target, REASONS_MIN_INTERVAL_S)
        return due

    def _decide(
        self,
        fleet: FleetSnapshot,
        target: str,
        lanes: dict[str, list[QueuedHead]],
        views: dict[str, MachineView],
        now: float,
        *,
        per_lane: int = PREFETCH_PER_LANE,
    ) -> tuple[list[Planned], dict[str, tuple[str, dict[str, str]]], bool]:
        """Walk lane heads in queue order, placing each on the local state if it fits."""
        heap = [(members[0].score, members[0].run_id, lane, 0) for lane, members in lanes.items()]
        heapq.heapify(heap)
        plans: list[Planned] = []
        waiting: dict[str, tuple[str, dict[str, str]]] = {}
        again = False
        while heap and len(plans) < MAX_CLAIMS_PER_PASS:
            _, _, lane, index = heapq.heappop(heap)
            head = lanes[lane][index]
            connection = fleet.connections.get(head.connection_id)
            if connection is None:
                continue  # deleted meanwhile: the run waits for its deadline
            mode = Mode(head.mode)
            selection = select_machine(views.values(), connection, mode)
            if selection.machine_id is None:
                waiting[lane] = (head.run_id, self._reasons(selection, views))
                continue
            view = views[selection.machine_id]
            plans.append(Planned(head, connection, view))
            views[view.machine_id] = view.model_copy(
                update={
                    "assigned": (
                        *view.assigned,
                        AssignedRun(
                            run_id=head.run_id,
                            mode=mode,
                            user=connection.session_user.casefold(),
                            fence=0,
                        ),
                    )
                }
            )
            if index + 1 < len(lanes[lane]):
                following = lanes[lane][index + 1]
                heapq.heappush(heap, (following.score, following.run_id, lane, index + 1))
            elif len(lanes[lane]) == per_lane:
                again = True  # the lane may have more runs than were fetched
        return plans, waiting, again or bool(heap)

    async def _claim(
        self,
        target: str,
        plans: list[Planned],
        waiting: dict[str, tuple[str, dict[str, str]]],
        now: float,
    ) -> tuple[int, int, int]:
        """Fetch and seal the secrets, claim in one round trip, publish in one window.

        Returns how many runs were placed, how many claims lost a race, and how many runs
        failed at hand-off.
        """
        if not plans:
            return 0, 0, 0
        secrets = await asyncio.gather(
            *(
                self.handoff.sealed_secret(p.connection, p.head.run_id, p.view.public_key or "")
                for p in plans
            ),
            return_exceptions=True,
        )
        claims: list[ClaimPlan] = []
        claimed: list[Planned] = []
        failed = 0
        for plan, secret in zip(plans, secrets, strict=True):
            if isinstance(secret, RunFailure):
                await self._fail_queued(plan.head, secret, now)
                failed += 1
                continue
            if isinstance(secret, RetryableRunError):
                waiting[plan.head.lane] = (
                    plan.head.run_id,
                    {plan.view.machine_id: f"{secret.code.value} (retrying)"},
                )
                self.request_later(target, max(RETRY_AFTER_S, secret.retry_after_s or 0.0))
                continue
            if isinstance(secret, BaseException):
                log.error("preparing the hand-off of run %s failed: %r", plan.head.run_id, secret)
                self.request_later(target, RETRY_AFTER_S)
                continue
            claims.append(
                ClaimPlan(
                    head=plan.head,
                    target=target,
                    machine_id=plan.view.machine_id,
                    user=plan.connection.session_user,
                    slots=slots_of(plan.view),
                    assignment_head=self._assignment_head(plan, secret),
                )
            )
            claimed.append(plan)
        outcomes = await self.runs.claim_many(claims, now)
        messages: list[OutboxMessage] = []
        placed = lost = 0
        for plan, outcome in zip(claimed, outcomes, strict=True):
            if outcome.result in {"user_busy", "no_slot"}:
                lost += 1
            elif outcome.ok:
                placed += 1
                messages.extend(outcome.messages)
                self._observe_dispatch(
                    target, plan.connection.kind.value, plan.head.mode, outcome, now
                )
            elif outcome.result == "error":
                log.warning("claim of run %s failed: %s", plan.head.run_id, outcome.extra)
        await self.publisher.send(messages)
        return placed, lost, failed

    def _assignment_head(self, plan: Planned, sealed: str) -> str:
        return ",".join(
            f'"{key}":{fragment(value)}'
            for key, value in (
                ("machine_id", plan.view.machine_id),
                ("mode", plan.head.mode),
                ("user", plan.connection.session_user),
                ("connection_kind", plan.connection.kind.value),
                ("max_run_s", self.settings.max_run_s),
                ("sealed_secret", sealed),
            )
        )

    @staticmethod
    def _reasons(selection: Selection, views: dict[str, MachineView]) -> dict[str, str]:
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
        return reasons

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
