"""Placement: put queued runs of a target on machines that can take them.

A pass reads the heads of the target's lanes and its machines' live state, plans the
placements with the pure core (``core/placement.py``: skip-ahead, reasons per machine), fetches
and seals each run's secret, claims the runs in one round trip and publishes the events and
assignments as one confirmed window (through the lifecycle). A claim that loses a race
(another replica filled the machine) just asks for another pass. Passes are requested by
events (a run queued, a slot freed, a heartbeat that changed a machine) and coalesced per
target. After Redis restarted or failed over, passes wait until the machines have reported
what they run (``MachineState.placement_hold_s``): a claim the store lost is repaired from
those reports before its run could be placed a second time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from dispatcher.codes import ErrorCode
from dispatcher.core.placement import Placement, Waiting, plan_pass, runs_per_lane
from dispatcher.core.selection import slots_of
from dispatcher.crypto import handoff_binding
from dispatcher.errors import RetryableRunError, RunFailure
from dispatcher.logs import fields
from dispatcher.metrics.hooks import MetricsHooks
from dispatcher.models import RunError, RunStatus
from dispatcher.settings import Settings
from dispatcher.usecases.handoff import Handoff
from dispatcher.usecases.lifecycle import Lifecycle, Window
from dispatcher.usecases.ports import Claim, FleetSource, MachineState, QueueEnding, RunReads
from dispatcher.usecases.results import Claimed, Failed, NoSlot, UserBusy

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1.0
# Why-waiting reasons: unchanged ones are checked against the store at most every
# REASONS_RECHECK_S, and a lane's reasons change at most every REASONS_MIN_INTERVAL_S (when
# machines fill and free up quickly, heads wait for milliseconds and their reasons flip with
# every pass; the last ones are still recorded, by a pass asked for when the interval ends).
REASONS_RECHECK_S = 5.0
REASONS_MIN_INTERVAL_S = 1.0


class Placer:
    """Runs coalesced placement passes, one at a time per target in this process."""

    def __init__(
        self,
        *,
        settings: Settings,
        fleet: FleetSource,
        runs: RunReads,
        machines: MachineState,
        lifecycle: Lifecycle,
        handoff: Handoff,
        metrics: MetricsHooks,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self.runs = runs
        self.machines = machines
        self.lifecycle = lifecycle
        self.handoff = handoff
        self.metrics = metrics
        self.clock = clock
        self._pending: set[str] = set()
        self._wakeup = asyncio.Event()
        self._retry_handles: dict[str, asyncio.TimerHandle] = {}
        self._reasons_seen: dict[tuple[str, str], tuple[dict[str, str], float]] = {}
        # The lanes whose head waited in the target's last pass for something else than a
        # free slot (a session, a machine online): only their head is read next time. Nothing
        # behind a waiting head is placed before it, and with a deep backlog in many lanes,
        # reading their runs made every pass cost more. (A lane waiting for slots is read
        # whole: slots free up all the time, and a head placed alone would cost a pass more.)
        self._blocked: dict[str, set[str]] = {}
        # The last pass's window, while RabbitMQ confirms it (see ``_pass``).
        self._sending: asyncio.Task[bool] | None = None

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
            held_s = await self._held_s()
            if held_s > 0:
                for target in targets:
                    self.request_later(target, held_s)
                continue
            if len(targets) > 1:
                # Only targets with queued runs need a pass: a live fleet asks for passes over
                # every machine that comes back online or changes sessions, and one round of
                # thousands of empty passes (two round trips each) held up the targets that
                # had runs to place until it ended. A run queued meanwhile asks again.
                try:
                    queued = set(await self.runs.targets())
                except Exception:
                    queued = targets  # the passes themselves will report the outage
                targets &= queued
            for target in sorted(targets):
                try:
                    await self._pass(target, overlap=True)
                except Exception:
                    log.exception(
                        "placement pass for %s failed; retrying soon",
                        target,
                        extra=fields(target=target),
                    )
                    self.request_later(target, RETRY_AFTER_S)

    async def _previous_confirmed(self) -> None:
        previous, self._sending = self._sending, None
        if previous is not None:
            # Shielded: a cancelled pass (shutdown) must not cancel a publication.
            await asyncio.shield(previous)

    async def _held_s(self) -> float:
        """How long placement waits after the store restarted or failed over (it may have lost
        claims of runs that machines still run: their next reports repair them first)."""
        try:
            return await self.machines.placement_hold_s(
                self.clock(), self.settings.heartbeat_interval_s, self.settings.offline_after_s
            )
        except Exception as exc:
            log.warning("placement waits: the store does not answer (%s)", type(exc).__name__)
            return RETRY_AFTER_S

    async def place(self, target: str) -> int:
        """One pass over ``target``; returns how many runs were handed to machines (their
        assignments and events confirmed by RabbitMQ)."""
        return await self._pass(target, overlap=False)

    async def _pass(self, target: str, *, overlap: bool) -> int:
        """One pass. ``overlap``: the pass's window is confirmed in the background, and the
        next pass reads and claims while it is; a pass's window goes out only once the one
        before it is confirmed (at most two windows in flight). Waiting for each window's
        confirms before the next pass began put their latency between every run and its
        placement. The runs are claimed in the store before their window goes out, so the
        next pass sees their slots taken; a crash before the confirms leaves the messages in
        the outbox, to the relay."""
        started = time.perf_counter()
        fleet = await self.fleet.load()
        lane_names = await self.runs.lane_names(target)
        if not lane_names:
            return 0
        now = self.clock()
        machines = [fleet.machines[m] for m in fleet.machine_ids_of_key(target)]
        views = {
            view.machine_id: view
            for view in await self.machines.views(machines, now, self.settings.offline_after_s)
        }
        per_lane = runs_per_lane(views.values())
        blocked = self._blocked.get(target, set())
        lanes = await self.runs.lane_members(target, lane_names, per_lane, heads_only=blocked)
        if not lanes:
            return 0
        plan = plan_pass(fleet.connections, lanes, views, per_lane=per_lane, heads_only=blocked)
        waiting = dict(plan.waiting)
        self._blocked[target] = {
            lane
            for lane, (_, reasons) in waiting.items()
            if ErrorCode.NoFreeSlot.value not in reasons.values()
        }
        async with self.lifecycle.window(wait=not overlap) as window:
            placed, lost_races, failed = await self._hand_off(
                window, target, plan.placements, waiting, now
            )
            if overlap and window.messages:
                await self._previous_confirmed()
        if window.sending is not None:
            self._sending = window.sending
        await self.lifecycle.record_reasons(target, self._reasons_due(target, waiting, now), now)
        self.metrics.decision_latency(time.perf_counter() - started)
        # A run failed at hand-off left its lane: the run behind it is the new head.
        if plan.again or lost_races or failed:
            self.request(target)
        return placed

    def _reasons_due(self, target: str, waiting: Waiting, now: float) -> Waiting:
        """The waiting lanes whose reasons are worth comparing with the store now."""
        due: Waiting = {}
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

    async def _hand_off(
        self,
        window: Window,
        target: str,
        placements: list[Placement],
        waiting: Waiting,
        now: float,
    ) -> tuple[int, int, int]:
        """Fetch and seal the secrets, claim in one round trip (the window publishes).

        Returns how many runs were placed, how many claims lost a race, and how many runs
        failed at hand-off.
        """
        if not placements:
            return 0, 0, 0
        reserved = await window.reserve_handoffs([p.head.run_id for p in placements])
        kept = [(p, f) for p, f in zip(placements, reserved, strict=True) if f is not None]
        secrets = await asyncio.gather(
            *(
                self.handoff.sealed_secret(
                    p.connection,
                    handoff_binding(p.head.run_id, p.view.machine_id, f.fence, f.flow_id, f.inputs),
                    p.view.public_key or "",
                )
                for p, f in kept
            ),
            return_exceptions=True,
        )
        claims: list[Claim] = []
        claimed: list[Placement] = []
        failed = 0
        for (placement, facts), secret in zip(kept, secrets, strict=True):
            head = placement.head
            if isinstance(secret, RunFailure):
                await self._fail_queued(window, head.run_id, secret, now)
                failed += 1
                continue
            if isinstance(secret, RetryableRunError):
                waiting[head.lane] = (
                    head.run_id,
                    {placement.view.machine_id: f"{secret.code.value} (retrying)"},
                )
                self.request_later(target, max(RETRY_AFTER_S, secret.retry_after_s or 0.0))
                continue
            if isinstance(secret, BaseException):
                log.error(
                    "preparing the hand-off of run %s failed: %r",
                    head.run_id,
                    secret,
                    extra=fields(run_id=head.run_id, target=target),
                )
                self.request_later(target, RETRY_AFTER_S)
                continue
            claims.append(
                Claim(
                    head=head,
                    target=target,
                    machine_id=placement.view.machine_id,
                    user=placement.connection.session_user,
                    connection_kind=placement.connection.kind,
                    max_run_s=self.settings.max_run_s,
                    sealed_secret=secret,
                    slots=slots_of(placement.view),
                    fence=facts.fence,
                )
            )
            claimed.append(placement)
        placed = lost = 0
        for placement, result in zip(claimed, await window.claim_many(claims, now), strict=True):
            match result:
                case Claimed(messages=messages):
                    placed += 1
                    kind = placement.connection.kind.value
                    self._observe_dispatch(target, kind, placement.head.mode, messages[0].body, now)
                case UserBusy() | NoSlot():
                    lost += 1
                case Failed(error=error):
                    log.warning(
                        "claim of run %s failed: %s",
                        placement.head.run_id,
                        error,
                        extra=fields(run_id=placement.head.run_id, target=target),
                    )
        return placed, lost, failed

    async def _fail_queued(
        self, window: Window, run_id: str, failure: RunFailure, now: float
    ) -> None:
        run = await self.runs.get(run_id)
        if run is None:
            return
        ending = QueueEnding(
            status=RunStatus.failed,
            error=RunError(code=failure.code, message=failure.message, detail=failure.detail),
            detail={"code": failure.code.value},
        )
        await window.unqueue(run, ending, now)

    def _observe_dispatch(
        self, target: str, kind: str, mode: str, event: bytes, now: float
    ) -> None:
        self.metrics.run_dispatched(target, kind, mode)
        record = json.loads(event)
        submitted = record.get("submitted_at") or record.get("queued_at") or now
        self.metrics.queue_wait(max(0.0, now - float(submitted)), target, kind)
