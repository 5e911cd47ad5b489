"""In-memory implementations of the ports, for in-process tests of the use cases and the worker.

:class:`FakeRunStore` implements ``RunTransitions`` and ``RunReads`` with the semantics of the
Lua scripts (status checks, fences, slots, lanes, deadlines, the outbox), on the same hash of
JSON fragments and with the same encodings (``adapters/redis/codec.py``), so that its results
and messages are those of the real store: ``tests/integration/test_store_contract.py`` runs the
same scenarios against both and expects identical results.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatcher.adapters.redis import codec
from dispatcher.adapters.redis.scripts import TL_MAX_BYTES
from dispatcher.codes import ErrorCode
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.ordering import lane_of
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.errors import BrokerUnavailable, StoreUnavailable
from dispatcher.models import (
    AssignedRun,
    Connection,
    Heartbeat,
    LiveRecord,
    Machine,
    MachineView,
    Priority,
    QueuedHead,
    Run,
    RunError,
    RunStatus,
)
from dispatcher.names import NO_SUBMITTER, event_of
from dispatcher.usecases.ports import (
    Admission,
    Adoption,
    BatchHandler,
    Claim,
    Delivery,
    Ending,
    HandoffFacts,
    QueueEnding,
    Refusal,
    Start,
    TargetOutlook,
    Verdict,
)
from dispatcher.usecases.results import (
    AdmitResult,
    BeatRecorded,
    CancelRequested,
    CancelResult,
    Claimed,
    ClaimResult,
    Conflict,
    Duplicate,
    Finished,
    FinishResult,
    HeartbeatOutcome,
    KeyRefused,
    Missing,
    NoSlot,
    NotDue,
    NotQueued,
    OutboxMessage,
    Queued,
    Refused,
    Rejected,
    RejectResult,
    Reordered,
    ReorderResult,
    Requeued,
    RequeueResult,
    RunState,
    Stale,
    Started,
    StartResult,
    Unqueued,
    UnqueueResult,
    UserBusy,
)

ZSet = dict[str, float]


def ordered(zset: ZSet) -> list[tuple[str, float]]:
    """A sorted set's members in Redis order: by score, equal scores by member."""
    return sorted(zset.items(), key=lambda item: (item[1], item[0]))


class FakeRunStore:
    """The run store in memory: the Lua scripts' rules, the Redis layout's indexes."""

    def __init__(self, retention_s: float = 7 * 24 * 3600) -> None:
        self.retention_s = retention_s
        self.runs: dict[str, dict[str, str]] = {}
        self.queues: dict[str, ZSet] = {}
        self.lanes: dict[tuple[str, str], ZSet] = {}
        self.lane_heads: dict[str, ZSet] = {}
        self.targets_with_runs: set[str] = set()
        self.deadlines: ZSet = {}
        self.running: ZSet = {}
        self.finished: dict[str, ZSet] = {}
        self.assigned: dict[str, dict[str, str]] = {}
        self.reasons: dict[str, dict[str, str]] = {}
        self.throttles: dict[tuple[str, int], int] = {}
        self.outbox: dict[str, OutboxMessage] = {}
        self.fence = 0
        self._ids = itertools.count(1)
        self.unavailable = False  # True: every call raises StoreUnavailable

    # ---- helpers mirroring lua/common.lua ---------------------------------------------------
    def _check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("the fake store is down")

    def _outbox(self, kind: str, routing_key: str, body: str) -> OutboxMessage:
        message = OutboxMessage(f"{next(self._ids)}-0", kind, routing_key, body.encode())
        self.outbox[message.id] = message
        return message

    def _event(self, run_id: str, status: str) -> OutboxMessage:
        run = self.runs[run_id]
        key = f"run.{status}.{run.get('_sub', NO_SUBMITTER)}"
        return self._outbox("event", key, codec.record_json(run))

    def _timeline(self, run_id: str, entry: str) -> None:
        """As ``append_timeline`` in common.lua, the bound included."""
        tl = self.runs[run_id].get("tl")
        if not tl or tl == "[]":
            self.runs[run_id]["tl"] = f"[{entry}]"
            return
        tl = f"{tl[:-1]},{entry}]"
        first = tl.find(',{"at":', 1)
        if len(tl) > TL_MAX_BYTES and first >= 0:
            cut = first
            while len(tl) - (cut - first) > TL_MAX_BYTES:
                following = tl.find(',{"at":', cut + 1)
                if following < 0:
                    break
                cut = following
            if cut > first:
                tl = tl[:first] + tl[cut:]
        self.runs[run_id]["tl"] = tl

    def _refresh_lane(self, target: str, lane: str) -> None:
        members = ordered(self.lanes.get((target, lane), {}))
        heads = self.lane_heads.setdefault(target, {})
        if members:
            heads[lane] = members[0][1]
        else:
            heads.pop(lane, None)

    def _unqueue(self, run_id: str, target: str, lane: str) -> None:
        self.queues.setdefault(target, {}).pop(run_id, None)
        self.lanes.setdefault((target, lane), {}).pop(run_id, None)
        self.deadlines.pop(run_id, None)
        self._refresh_lane(target, lane)
        if not self.queues[target]:
            self.targets_with_runs.discard(target)

    def _enqueue(self, run_id: str, target: str, lane: str, score: float, deadline: float) -> None:
        self.queues.setdefault(target, {})[run_id] = score
        self.lanes.setdefault((target, lane), {})[run_id] = score
        heads = self.lane_heads.setdefault(target, {})
        heads[lane] = min(heads.get(lane, score), score)  # ZADD LT
        self.deadlines[run_id] = deadline
        self.targets_with_runs.add(target)

    @staticmethod
    def _lane_of(run: Run) -> str:
        return lane_of(run.connection_id, run.mode.value, run.priority.value)

    # ---- transitions ------------------------------------------------------------------------
    async def admit(self, admission: Admission) -> AdmitResult:
        self._check()
        request, target, now = admission.request, admission.target, admission.now
        existing = self.runs.get(request.run_id, {}).get("status")
        if existing is not None:
            return Duplicate(status=codec.status_of(existing))
        fields = [
            *codec.request_fields(request, now, admission.submitter),
            "target",
            codec.fragment(target),
            "connection_kind",
            codec.fragment(admission.connection_kind.value),
        ]
        run = self.runs.setdefault(request.run_id, {})
        run.update(zip(fields[::2], fields[1::2], strict=True))
        throttle = (request.connection_id, int(now // 60))
        refusal: tuple[str, RunError] | None = None
        if self.throttles.get(throttle, 0) >= admission.throttle_limit:
            message = f"more than {admission.throttle_limit} runs per minute on this connection"
            refusal = (
                "throttled",
                RunError(code=ErrorCode.DesktopFlowsActionThrottled, message=message),
            )
        elif len(self.queues.get(target, {})) >= admission.queue_cap:
            full = RunError(code=ErrorCode.QueueFull, message=f"the queue of {target} is full")
            refusal = ("queue_full", full)
        if refusal is not None:
            run.update(
                status='"rejected"', error=codec.error_fragment(refusal[1]), finished_at=repr(now)
            )
            self._timeline(request.run_id, codec.timeline_entry("rejected", now))
            self._index_finished("rejected", request.run_id, now)
            code = (
                ErrorCode.DesktopFlowsActionThrottled
                if refusal[0] == "throttled"
                else ErrorCode.QueueFull
            )
            return Rejected(code=code, messages=(self._event(request.run_id, "rejected"),))
        self.throttles[throttle] = self.throttles.get(throttle, 0) + 1
        lane = lane_of(request.connection_id, request.mode.value, request.priority.value)
        run.update(
            status='"queued"',
            queued_at=repr(now),
            queue_deadline=repr(admission.deadline),
            _score=repr(admission.score),
            _lane=f'"{lane}"',
        )
        self._timeline(request.run_id, codec.timeline_entry("queued", now, {"target": target}))
        self._enqueue(request.run_id, target, lane, admission.score, admission.deadline)
        return Queued(messages=(self._event(request.run_id, "queued"),))

    async def reject(self, refusal: Refusal) -> RejectResult:
        self._check()
        request, now = refusal.request, refusal.now
        existing = self.runs.get(request.run_id, {}).get("status")
        if existing is not None:
            return Duplicate(status=codec.status_of(existing))
        fields = codec.request_fields(request, now, refusal.submitter)
        if refusal.target is not None:
            fields += ["target", codec.fragment(refusal.target)]
        if refusal.connection_kind is not None:
            fields += ["connection_kind", codec.fragment(refusal.connection_kind.value)]
        run = self.runs.setdefault(request.run_id, {})
        run.update(zip(fields[::2], fields[1::2], strict=True))
        error = RunError(code=refusal.code, message=refusal.message)
        run.update(status='"rejected"', error=codec.error_fragment(error), finished_at=repr(now))
        entry = codec.timeline_entry("rejected", now, {"code": refusal.code.value})
        self._timeline(request.run_id, entry)
        self._index_finished("rejected", request.run_id, now)
        return Rejected(code=refusal.code, messages=(self._event(request.run_id, "rejected"),))

    async def reserve_handoffs(self, run_ids: Sequence[str]) -> list[HandoffFacts | None]:
        self._check()
        first, self.fence = self.fence + 1, self.fence + len(run_ids)
        return [
            codec.handoff_facts(first + index, self.runs.get(run_id, {}).get("req"))
            for index, run_id in enumerate(run_ids)
        ]

    async def claim_many(self, claims: Sequence[Claim], now: float) -> list[ClaimResult]:
        self._check()
        return [self._claim(claim, now) for claim in claims]

    def _claim(self, claim: Claim, now: float) -> ClaimResult:
        head, machine_id = claim.head, claim.machine_id
        run = self.runs.get(head.run_id, {})
        if run.get("status") != '"queued"':
            return NotQueued()
        user, unattended = claim.user.casefold(), 0
        for value in self.assigned.get(machine_id, {}).values():
            other_mode, _, other_user = value.split("|", 2)
            if other_user == user:
                return UserBusy()
            unattended += other_mode == "unattended"
        if head.mode == "unattended" and unattended >= claim.slots:
            return NoSlot()
        fence = claim.fence
        run.update(
            status='"dispatched"',
            machine_id=f'"{machine_id}"',
            fence=str(fence),
            dispatched_at=repr(now),
        )
        self._unqueue(head.run_id, claim.target, head.lane)
        self.assigned.setdefault(machine_id, {})[head.run_id] = codec.encode_assigned(
            head.mode, fence, user
        )
        self._timeline(
            head.run_id, codec.timeline_entry("dispatched", now, {"machine_id": machine_id})
        )
        assignment = codec.assignment_json(fence, codec.assignment_head(claim), run["req"])
        event = self._event(head.run_id, "dispatched")
        return Claimed(
            fence=fence, messages=(event, self._outbox("assign", machine_id, assignment))
        )

    async def start_many(self, starts: Sequence[Start], now: float) -> list[StartResult]:
        self._check()
        return [self._start(start, now) for start in starts]

    def _start(self, start: Start, now: float) -> StartResult:
        run = self.runs.get(start.run_id, {})
        status, fence = run.get("status"), run.get("fence")
        here = run.get("machine_id") == f'"{start.machine_id}"' and fence == str(start.fence)
        if here and status == '"running"' and run.get("_worker") == f'"{start.worker_id}"':
            return Started()  # this worker asks again: its answer was lost
        if status != '"dispatched"' or not here:
            return Refused(status=codec.status_of(status), fence=codec.fence_of(fence))
        run.update(status='"running"', started_at=repr(now), _worker=f'"{start.worker_id}"')
        self.running[start.run_id] = start.run_deadline
        self._timeline(
            start.run_id, codec.timeline_entry("started", now, {"machine_id": start.machine_id})
        )
        return Started(messages=(self._event(start.run_id, "started"),))

    async def adopt_many(self, adoptions: Sequence[Adoption], now: float) -> list[StartResult]:
        self._check()
        return [self._adopt(adoption, now) for adoption in adoptions]

    def _adopt(self, adoption: Adoption, now: float) -> StartResult:
        """As adopt.lua: a run that lost its claim and start becomes running on the reporter."""
        run_id, machine_id, fence = adoption.run.run_id, adoption.machine_id, adoption.fence
        stored = self.runs.get(run_id, {})
        status = stored.get("status")
        here = stored.get("machine_id") == f'"{machine_id}"' and stored.get("fence") == str(fence)
        if status == '"queued"':
            self._unqueue(run_id, adoption.run.target or "", stored["_lane"][1:-1])
        elif status == '"dispatched"' and not here:
            held = (stored.get("machine_id") or '""')[1:-1]
            self.assigned.get(held, {}).pop(run_id, None)
        else:
            return Refused(
                status=codec.status_of(status), fence=codec.fence_of(stored.get("fence"))
            )
        stored.update(
            status='"running"',
            machine_id=f'"{machine_id}"',
            fence=str(fence),
            started_at=repr(now),
            _worker=f'"{adoption.worker_id}"',
        )
        stored.setdefault("dispatched_at", repr(now))
        self.assigned.setdefault(machine_id, {})[run_id] = codec.encode_assigned(
            adoption.run.mode.value, fence, adoption.user.casefold()
        )
        self.running[run_id] = adoption.run_deadline
        self.fence = max(self.fence, fence)
        detail = {"machine_id": machine_id, "reconciled": True}
        self._timeline(run_id, codec.timeline_entry("started", now, detail))
        return Started(messages=(self._event(run_id, "started"),))

    def _index_finished(self, status: str, run_id: str, now: float) -> None:
        """As ``index_finished`` in common.lua: add, and drop up to 100 entries past retention."""
        index = self.finished.setdefault(status, {})
        index[run_id] = now
        old = [member for member, at in ordered(index) if at < now - self.retention_s][:100]
        for member in old:
            del index[member]

    async def finish_many(self, endings: Sequence[Ending], now: float) -> list[FinishResult]:
        self._check()
        return [self._finish(ending, now) for ending in endings]

    def _finish(self, ending: Ending, now: float) -> FinishResult:
        run = self.runs.get(ending.run_id)
        if run is None or "status" not in run:
            return Missing()
        status = run["status"]
        if (ending.fence is not None and run.get("fence") != str(ending.fence)) or (
            ending.machine_id and run.get("machine_id") != codec.fragment(ending.machine_id)
        ):
            return Stale(status=codec.status_of(status), fence=codec.fence_of(run.get("fence")))
        if status not in {codec.fragment(s.value) for s in ending.allowed}:
            return Conflict(status=codec.status_of(status))
        run.update(status=f'"{ending.status.value}"', finished_at=repr(now))
        if ending.error is not None:
            run["error"] = codec.error_fragment(ending.error)
        if ending.outputs is not None:
            run["outputs"] = codec.fragment(ending.outputs)
        self.assigned.get(ending.machine_id, {}).pop(ending.run_id, None)
        self.running.pop(ending.run_id, None)
        self._index_finished(ending.status.value, ending.run_id, now)
        self._timeline(ending.run_id, codec.timeline_entry(ending.status.value, now, ending.detail))
        return Finished(messages=(self._event(ending.run_id, ending.status.value),))

    async def unqueue(self, run: Run, ending: QueueEnding, now: float) -> UnqueueResult:
        self._check()
        stored = self.runs.get(run.run_id, {})
        if stored.get("status") != '"queued"':
            self.deadlines.pop(run.run_id, None)
            return Conflict(status=codec.status_of(stored.get("status")))
        if ending.due_only and float(stored["queue_deadline"]) > now:
            return NotDue()
        self._unqueue(run.run_id, run.target or "", self._lane_of(run))
        status = ending.status.value
        stored.update(
            status=f'"{status}"', finished_at=repr(now), error=codec.error_fragment(ending.error)
        )
        self._index_finished(status, run.run_id, now)
        self._timeline(run.run_id, codec.timeline_entry(status, now, ending.detail))
        return Unqueued(messages=(self._event(run.run_id, status),))

    async def requeue(self, run: Run, *, reason: str, now: float) -> RequeueResult:
        self._check()
        stored = self.runs.get(run.run_id, {})
        fence = str(run.fence) if run.fence is not None else ""
        if stored.get("status") != '"dispatched"' or stored.get("fence") != fence:
            return Conflict(status=codec.status_of(stored.get("status")))
        lane, score = stored["_lane"][1:-1], float(stored["_score"])
        stored["status"] = '"queued"'
        for name in ("machine_id", "fence", "dispatched_at"):
            stored.pop(name, None)
        self.assigned.get(run.machine_id or "", {}).pop(run.run_id, None)
        self._enqueue(run.run_id, run.target or "", lane, score, float(stored["queue_deadline"]))
        entry = codec.timeline_entry(
            "requeued", now, {"reason": reason, "machine_id": run.machine_id}
        )
        self._timeline(run.run_id, entry)
        return Requeued(messages=(self._event(run.run_id, "queued"),))

    async def reorder(
        self, run: Run, *, score: float, priority: Priority, event: str, now: float
    ) -> ReorderResult:
        self._check()
        stored, target = self.runs.get(run.run_id, {}), run.target or ""
        if stored.get("status") != '"queued"':
            return Conflict(status=codec.status_of(stored.get("status")))
        old_lane = self._lane_of(run)
        new_lane = lane_of(run.connection_id, run.mode.value, priority.value)
        self.lanes.setdefault((target, old_lane), {}).pop(run.run_id, None)
        self._refresh_lane(target, old_lane)
        self.queues.setdefault(target, {})[run.run_id] = score
        self.lanes.setdefault((target, new_lane), {})[run.run_id] = score
        self._refresh_lane(target, new_lane)
        stored.update(
            _score=repr(score), _lane=f'"{new_lane}"', priority=codec.fragment(priority.value)
        )
        self._timeline(run.run_id, codec.timeline_entry(event, now, {"priority": priority.value}))
        return Reordered()

    async def request_cancel(self, run: Run, *, reason: str, now: float) -> CancelResult:
        self._check()
        stored = self.runs.get(run.run_id, {})
        if stored.get("status") != '"running"' or "machine_id" not in stored:
            return Conflict(status=codec.status_of(stored.get("status")))
        stored["cancel_requested"] = "true"
        self._timeline(
            run.run_id, codec.timeline_entry("cancel_requested", now, {"reason": reason})
        )
        fence = stored.get("fence")
        body = codec.cancel_body(run.run_id, None if fence is None else int(fence), reason)
        machine_id = stored["machine_id"][1:-1]
        return CancelRequested(messages=(self._outbox("cancel", machine_id, body.decode()),))

    async def record_reasons(
        self, target: str, waiting: dict[str, tuple[str, dict[str, str]]], now: float
    ) -> int:
        self._check()
        changed = 0
        stored = self.reasons.setdefault(target, {})
        for lane, (run_id, reasons) in waiting.items():
            old = stored.get(lane)
            if old is not None and json.loads(old).get("machines") == reasons:
                continue
            changed += 1
            stored[lane] = codec.fragment({"machines": reasons, "since": now})
            if self.runs.get(run_id, {}).get("status") == '"queued"':
                self._timeline(run_id, codec.timeline_entry("waiting", now, {"reasons": reasons}))
        return changed

    async def forget_deadline(self, run_id: str) -> None:
        self.deadlines.pop(run_id, None)

    async def forget_running(self, run_id: str) -> None:
        self.running.pop(run_id, None)

    # ---- reads ------------------------------------------------------------------------------
    async def get(self, run_id: str) -> Run | None:
        self._check()
        stored = self.runs.get(run_id)
        return codec.parse_run(dict(stored)) if stored else None

    async def get_many(self, run_ids: Sequence[str]) -> list[Run | None]:
        return [await self.get(run_id) for run_id in run_ids]

    async def briefs(self, run_ids: Sequence[str]) -> list[Run | None]:
        runs = await self.get_many(run_ids)
        return [r.model_copy(update={"timeline": []}) if r else None for r in runs]

    async def states(self, run_ids: Sequence[str]) -> list[RunState]:
        self._check()
        states = []
        for run_id in run_ids:
            stored = self.runs.get(run_id, {})
            machine = stored.get("machine_id")
            status, fence = (
                codec.status_of(stored.get("status")),
                codec.fence_of(stored.get("fence")),
            )
            states.append(RunState(status, fence, json.loads(machine) if machine else None))
        return states

    async def score_of(self, run_id: str) -> float | None:
        raw = self.runs.get(run_id, {}).get("_score")
        return float(raw) if raw is not None else None

    async def position(self, run: Run) -> int | None:
        members = [m for m, _ in ordered(self.queues.get(run.target or "", {}))]
        return members.index(run.run_id) + 1 if run.run_id in members else None

    async def queue_page(self, target: str, start: int, stop: int) -> list[tuple[str, float]]:
        members = ordered(self.queues.get(target, {}))
        return members[start : None if stop == -1 else stop + 1]

    async def targets(self) -> list[str]:
        self._check()
        return sorted(self.targets_with_runs)

    async def lane_names(self, target: str) -> list[str]:
        self._check()
        return [lane for lane, _ in ordered(self.lane_heads.get(target, {}))]

    async def lane_members(
        self, target: str, lanes: list[str], per_lane: int, heads_only: Collection[str] = ()
    ) -> dict[str, list[QueuedHead]]:
        members = {
            lane: ordered(self.lanes.get((target, lane), {}))[
                : 1 if lane in heads_only else per_lane
            ]
            for lane in lanes
        }
        return {
            lane: [QueuedHead(run_id, score, lane) for run_id, score in rows]
            for lane, rows in members.items()
            if rows
        }

    async def due_deadlines(self, now: float, limit: int = 500) -> list[str]:
        self._check()
        return [run_id for run_id, at in ordered(self.deadlines) if at <= now][:limit]

    async def overdue_running(self, now: float, limit: int = 500) -> list[str]:
        return [run_id for run_id, at in ordered(self.running) if at <= now][:limit]

    async def finished_since(self, status: RunStatus, since: float, until: float) -> list[str]:
        zset = self.finished.get(status.value, {})
        return [run_id for run_id, at in ordered(zset) if since <= at <= until]

    async def lane_reasons(self, target: str, lane: str) -> dict[str, Any] | None:
        raw = self.reasons.get(target, {}).get(lane)
        return json.loads(raw) if raw else None


class FakeMachines:
    """``MachineState`` in memory; what runs where comes from the store's ``assigned``."""

    def __init__(self, store: FakeRunStore) -> None:
        self.store = store
        self.heartbeats: dict[str, tuple[Heartbeat, float]] = {}
        self.offline: dict[str, float] = {}
        self.pinned: dict[str, str] = {}
        self.mismatches: dict[str, float] = {}

    async def pin_key(self, machine_id: str, public_key: str, now: float) -> bool:
        if self.pinned.setdefault(machine_id, public_key) == public_key:
            return True
        self.mismatches[machine_id] = now
        return False

    async def record_heartbeats(
        self, heartbeats: Sequence[Heartbeat], received_at: float
    ) -> list[HeartbeatOutcome]:
        outcomes: list[HeartbeatOutcome] = []
        for heartbeat in heartbeats:
            machine_id = heartbeat.machine_id
            if heartbeat.public_key and not await self.pin_key(
                machine_id, heartbeat.public_key, received_at
            ):
                outcomes.append(KeyRefused())
                continue
            seen = self.heartbeats.get(machine_id)
            before = LiveRecord.of(seen[0]) if seen else None
            self.heartbeats[machine_id] = (heartbeat, received_at)
            was_offline = self.offline.pop(machine_id, None) is not None
            changed = before != LiveRecord.of(heartbeat)
            outcomes.append(BeatRecorded(was_offline, changed, before if changed else None))
        return outcomes

    async def record_heartbeat(
        self, heartbeat: Heartbeat, received_at: float
    ) -> tuple[Heartbeat | None, bool]:
        previous = self.heartbeats.get(heartbeat.machine_id)
        self.heartbeats[heartbeat.machine_id] = (heartbeat, received_at)
        was_offline = self.offline.pop(heartbeat.machine_id, None) is not None
        return (previous[0] if previous else None), was_offline

    async def views(
        self, machines: Sequence[Machine], now: float, offline_after_s: float
    ) -> list[MachineView]:
        views = []
        for machine in machines:
            seen = self.heartbeats.get(machine.machine_id)
            heartbeat, last = seen if seen else (None, None)
            online = last is not None and now - last <= offline_after_s
            offline_since = None if online or last is None else last + offline_after_s
            views.append(
                MachineView(
                    machine=machine,
                    online=online,
                    offline_since=offline_since,
                    sessions=heartbeat.sessions if heartbeat else (),
                    assigned=tuple(await self.assigned(machine.machine_id)),
                    has_public_key=machine.machine_id in self.pinned,
                    public_key=self.pinned.get(machine.machine_id),
                    key_mismatch=machine.machine_id in self.mismatches,
                )
            )
        return views

    async def stale(self, now: float, offline_after_s: float) -> list[str]:
        return sorted(m for m, (_, at) in self.heartbeats.items() if at <= now - offline_after_s)

    async def offline_marks(self) -> dict[str, float]:
        return dict(self.offline)

    async def mark_offline(self, machine_id: str, since: float) -> bool:
        if machine_id in self.offline:
            return False
        self.offline[machine_id] = since
        return True

    async def assigned(self, machine_id: str) -> list[AssignedRun]:
        values = self.store.assigned.get(machine_id, {})
        return [codec.decode_assigned(run_id, value) for run_id, value in values.items()]

    async def assigned_to(self, machine_ids: Sequence[str]) -> dict[str, list[AssignedRun]]:
        found = {machine_id: await self.assigned(machine_id) for machine_id in machine_ids}
        return {machine_id: runs for machine_id, runs in found.items() if runs}

    async def placement_hold_s(
        self, now: float, heartbeat_interval_s: float, offline_after_s: float
    ) -> float:
        return 0.0  # an in-memory store never restarts


class FakeFleet:
    """``FleetSource`` over a fixed snapshot (replace ``snapshot`` to change the fleet)."""

    def __init__(self, snapshot: FleetSnapshot) -> None:
        self.snapshot = snapshot
        self.unavailable = False

    async def load(self, force: bool = False) -> FleetSnapshot:
        if self.unavailable:
            raise StoreUnavailable("the fake store is down")
        return self.snapshot

    def cached(self) -> FleetSnapshot | None:
        return self.snapshot


class FakePublisher:
    """``Publisher`` that records each window it is given; what it publishes leaves the
    store's outbox, what it fails to publish stays there for ``relay``."""

    def __init__(self, store: FakeRunStore) -> None:
        self.store = store
        self.windows: list[list[OutboxMessage]] = []
        self.down = False
        self.closed = False

    @property
    def sent(self) -> list[OutboxMessage]:
        return [message for window in self.windows for message in window]

    def events(self, routing_key: str | None = None) -> list[dict[str, Any]]:
        """The bodies of the events published (of one routing key)."""
        return [
            json.loads(m.body)
            for m in self.sent
            if m.kind == "event" and routing_key in (None, m.routing_key, event_of(m.routing_key))
        ]

    def of_kind(self, kind: str) -> list[OutboxMessage]:
        return [m for m in self.sent if m.kind == kind]

    async def send(self, messages: Sequence[OutboxMessage]) -> bool:
        if self.down:
            return False
        self.windows.append(list(messages))
        for message in messages:
            self.store.outbox.pop(message.id, None)
        return True

    async def relay(self, older_than_s: float) -> int:
        left = list(self.store.outbox.values())
        return len(left) if left and await self.send(left) else 0

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeDelivery:
    """An AMQP delivery as the handlers read it."""

    body: bytes
    routing_key: str | None = "submit"
    type: str | None = None
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    user_id: str | None = "guest"  # the admin identity of the tests' settings
    headers: dict[str, Any] | None = None


@dataclass
class FakeBroker:
    """``Broker`` that records what is published and hands deliveries to the handlers."""

    published: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    handlers: dict[str, BatchHandler] = field(default_factory=dict)
    machine_queues: set[str] = field(default_factory=set)
    down: bool = False
    refuse_consumers: int = 0  # how many consume calls fail (the connection breaks)
    consumers: list[asyncio.Task[None]] = field(default_factory=list)
    exclusive_queues: set[str] = field(default_factory=set)

    async def consume(
        self,
        queue: str,
        handler: BatchHandler,
        *,
        batch_size: int,
        prefetch: int | None = None,
        gather_s: float = 0.0,
    ) -> asyncio.Task[None]:
        if self.refuse_consumers > 0:
            self.refuse_consumers -= 1
            raise BrokerUnavailable("the fake broker's connection broke")
        self.handlers[queue] = handler
        task = asyncio.create_task(asyncio.Event().wait(), name=f"fake-consumer:{queue}")
        self.consumers.append(task)
        return task

    async def hold_exclusive_queue(self, queue: str) -> None:
        self.exclusive_queues.add(queue)

    async def stop_consuming(self, timeout_s: float, queues: Sequence[str] | None = None) -> bool:
        """Nothing is delivered any more (``deliver`` to a stopped queue raises)."""
        for task in self.consumers:
            task.cancel()
        await asyncio.gather(*self.consumers, return_exceptions=True)
        self.consumers.clear()
        self.handlers.clear()
        return True

    async def publish_json(
        self, role: str, routing_key: str, body: bytes, *, kind: str, mandatory: bool = True
    ) -> None:
        if self.down:
            raise ConnectionError("the fake broker is down")
        self.published.append((role, routing_key, body, kind))

    async def publish_many_json(
        self,
        role: str,
        messages: Sequence[tuple[str, bytes]],
        *,
        kind: str,
        mandatory: bool = True,
    ) -> None:
        for routing_key, body in messages:
            await self.publish_json(role, routing_key, body, kind=kind, mandatory=mandatory)

    async def publish_reply(self, machine_id: str, body: bytes) -> None:
        await self.publish_json("machines", f"{machine_id}.replies", body, kind="reply")

    async def ensure_machine_queue(self, machine_id: str) -> None:
        self.machine_queues.add(machine_id)

    async def deliver(self, queue: str, *messages: Delivery) -> list[Verdict]:
        return await self.handlers[queue](list(messages))


class FakeLeases:
    def __init__(self, held: bool = True) -> None:
        self.held = held

    async def hold(self, role: str, ttl_s: float) -> bool:
        return self.held


class PassLog:
    """``PassRequests`` that remembers which targets were asked for."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    def request(self, *targets: str) -> None:
        self.requested.extend(targets)


class FakeTokens:
    """``TokenSource``: one access token per connection, an optional refresh-token expiry, or
    a failure to raise."""

    def __init__(self, refresh_expiry: float | None = None) -> None:
        self.refresh_expiry = refresh_expiry
        self.failure: Exception | None = None

    async def access_token(self, connection: Connection, valid_for_s: float) -> str:
        if self.failure is not None:
            raise self.failure
        return f"token-of-{connection.connection_id}"

    async def refresh_token_expiry(self, connection: Connection) -> float | None:
        return self.refresh_expiry


class FakePasswords:
    """``PasswordSource``: a password per connection, or a failure to raise."""

    def __init__(self) -> None:
        self.failure: Exception | None = None

    async def password(self, connection: Connection) -> str:
        if self.failure is not None:
            raise self.failure
        return f"password-of-{connection.connection_id}"


class FakeTraces:
    """``TraceStore`` in memory; ``broken`` makes every write fail as an unreachable store."""

    def __init__(self) -> None:
        self.records: dict[str, list[TraceRecord]] = {}
        self.machine_changes: list[MachineChange] = []
        self.saved: dict[str, TargetOutlook] = {}
        self.broken = False

    def _check(self) -> None:
        if self.broken:
            raise StoreUnavailable("the trace store is unreachable")

    async def record(self, records: Sequence[TraceRecord]) -> None:
        self._check()
        for record in records:
            self.records.setdefault(record.target, []).append(record)

    async def read(
        self, target: str, after: str = "-", limit: int | None = None
    ) -> tuple[list[TraceRecord], str]:
        records = self.records.get(target, [])
        start = 0 if after == "-" else int(after) + 1
        end = len(records) if limit is None else min(len(records), start + limit)
        return records[start:end], str(end - 1) if end > start else after

    async def traced_targets(self) -> list[str]:
        return sorted(self.records)

    async def record_changes(self, changes: Sequence[MachineChange]) -> None:
        self._check()
        self.machine_changes.extend(changes)

    async def changes(self) -> list[MachineChange]:
        return list(self.machine_changes)

    async def save_outlooks(self, outlooks: dict[str, TargetOutlook]) -> None:
        self._check()
        self.saved = dict(outlooks)

    async def outlooks(self) -> dict[str, TargetOutlook]:
        return dict(self.saved)


class Clock:
    """A clock the test moves."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class RecordingMetrics:
    """``MetricsHooks`` and ``WorkerHooks`` that record every call as (name, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, (*args, *kwargs.values())))

        return record

    def named(self, name: str) -> list[tuple[Any, ...]]:
        return [args for call, args in self.calls if call == name]
