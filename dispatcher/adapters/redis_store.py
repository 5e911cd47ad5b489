"""The run store: runs, queues, lanes, deadlines and machine slots in Redis.

Every state change is one Lua script (``lua/*.lua``) so that it is atomic across dispatcher
replicas and workers, and each script records the messages it implies (events, assignments)
in the outbox stream in the same step: a crash between the change and its publication loses
nothing, the outbox relay publishes it later.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.models import (
    AssignedRun,
    Heartbeat,
    Machine,
    MachineView,
    Priority,
    Run,
    RunRequest,
    RunStatus,
)
from dispatcher.names import Names

_SCRIPTS = ("admit", "reject", "claim", "start", "finish", "unqueue", "requeue", "reorder")


def fragment(value: Any) -> str:
    """A value as the JSON fragment stored in a run hash field."""
    return json.dumps(value, separators=(",", ":"))


def timeline_entry(event: str, at: float, detail: dict[str, Any] | None = None) -> str:
    entry: dict[str, Any] = {"at": at, "event": event}
    if detail:
        entry["detail"] = detail
    return fragment(entry)


def error_fragment(code: ErrorCode, message: str, detail: dict[str, Any] | None = None) -> str:
    error: dict[str, Any] = {"code": code.value, "message": message}
    if detail is not None:
        error["detail"] = detail
    return fragment(error)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message recorded with a state change, to publish and then delete from the outbox."""

    id: str
    kind: str  # "event" | "assign" | "cancel"
    routing_key: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a script did: ``result`` (ok, duplicate, conflict ...) and messages to publish."""

    result: str
    messages: tuple[OutboxMessage, ...] = ()
    extra: tuple[Any, ...] = ()

    @property
    def ok(self) -> bool:
        return self.result == "ok"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _outcome(raw: Sequence[Any]) -> Outcome:
    result = _text(raw[0])
    messages: list[OutboxMessage] = []
    extra: list[Any] = []
    for item in raw[1:]:
        if isinstance(item, list) and len(item) == 4:
            body = item[3] if isinstance(item[3], bytes) else str(item[3]).encode()
            messages.append(OutboxMessage(_text(item[0]), _text(item[1]), _text(item[2]), body))
        else:
            extra.append(_text(item) if isinstance(item, bytes) else item)
    return Outcome(result, tuple(messages), tuple(extra))


def load_scripts() -> dict[str, str]:
    """The Lua sources, each prefixed with the shared helpers."""
    package = resources.files("dispatcher.adapters") / "lua"
    common = (package / "common.lua").read_text()
    return {name: common + "\n" + (package / f"{name}.lua").read_text() for name in _SCRIPTS}


_NOTE = (
    "local tl = redis.call('HGET', KEYS[1], 'tl') "
    "if not tl then return 0 end "
    "if tl == '[]' then tl = '[' .. ARGV[1] .. ']' "
    "else tl = string.sub(tl, 1, -2) .. ',' .. ARGV[1] .. ']' end "
    "redis.call('HSET', KEYS[1], 'tl', tl) return 1"
)


@dataclass(frozen=True)
class QueuedHead:
    """The first run of a lane: what placement looks at."""

    run_id: str
    score: float
    lane: str

    @property
    def connection_id(self) -> str:
        return self.lane.split("|", 2)[0]

    @property
    def mode(self) -> str:
        return self.lane.split("|", 2)[1]


@dataclass(frozen=True)
class Ending:
    """How a dispatched or running run ends (see finish.lua)."""

    run_id: str
    machine_id: str
    fence: int | None
    allowed: tuple[RunStatus, ...]
    status: RunStatus
    error: str = ""
    outputs: dict[str, Any] | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClaimPlan:
    """A decision to hand ``head`` to ``machine_id``, to be made atomic by the claim script."""

    head: QueuedHead
    target: str
    machine_id: str
    user: str
    slots: int
    assignment_head: str


class RunStore:
    """Atomic operations on runs. Shared by dispatcher replicas, workers and the CLI."""

    def __init__(self, redis: aioredis.Redis, names: Names, retention_s: float) -> None:
        self.redis = redis
        self.names = names
        self.retention_s = int(retention_s)
        self._scripts = {
            name: redis.register_script(source) for name, source in load_scripts().items()
        }

    async def _run_script(self, name: str, keys: list[str], args: list[Any]) -> Outcome:
        raw = await self._scripts[name](keys=keys, args=args)
        return _outcome(raw)

    # ---- admission ----------------------------------------------------------------------------
    @staticmethod
    def request_fields(request: RunRequest, now: float) -> list[str]:
        """The immutable part of a run record, as field/value pairs."""
        submitted = request.submitted_at.timestamp() if request.submitted_at else now
        req = request.model_dump(mode="json", exclude={"priority", "submitted_at"})
        req["submitted_at"] = submitted
        return ["req", fragment(req), "priority", fragment(request.priority.value)]

    async def admit(
        self,
        request: RunRequest,
        *,
        target: str,
        connection_kind: str,
        score: float,
        deadline: float,
        throttle_limit: int,
        queue_cap: int,
        now: float,
    ) -> Outcome:
        """Queue a run, or report it as duplicate or rejected (throttled, queue full)."""
        names = self.names
        lane = lane_of(request.connection_id, request.mode.value, request.priority.value)
        window = int(now // 60)
        fields = [
            *self.request_fields(request, now),
            "target",
            fragment(target),
            "connection_kind",
            fragment(connection_kind),
        ]
        return await self._run_script(
            "admit",
            [
                names.run(request.run_id),
                names.queue(target),
                names.lane(target, lane),
                names.lanes(target),
                names.queue_deadlines,
                names.targets,
                names.throttle(request.connection_id, window),
                names.outbox,
                names.finished(RunStatus.rejected),
            ],
            [
                request.run_id,
                repr(score),
                repr(deadline),
                lane,
                target,
                throttle_limit,
                queue_cap,
                repr(now),
                timeline_entry("queued", now, {"target": target}),
                self.retention_s,
                error_fragment(
                    ErrorCode.DesktopFlowsActionThrottled,
                    f"more than {throttle_limit} runs per minute on this connection",
                ),
                error_fragment(ErrorCode.QueueFull, f"the queue of {target} is full"),
                timeline_entry("rejected", now),
                *fields,
            ],
        )

    async def reject(
        self,
        request: RunRequest,
        code: ErrorCode,
        message: str,
        now: float,
        extra_fields: Iterable[str] = (),
    ) -> Outcome:
        """Record a run rejected at admission (a duplicate run id keeps the existing run)."""
        return await self._run_script(
            "reject",
            [
                self.names.run(request.run_id),
                self.names.outbox,
                self.names.finished(RunStatus.rejected),
            ],
            [
                request.run_id,
                repr(now),
                error_fragment(code, message),
                timeline_entry("rejected", now, {"code": code.value}),
                self.retention_s,
                *self.request_fields(request, now),
                *extra_fields,
            ],
        )

    # ---- placement ----------------------------------------------------------------------------
    async def lane_members(self, target: str, per_lane: int) -> dict[str, list[QueuedHead]]:
        """The first ``per_lane`` runs of every lane of a target (two round trips)."""
        lanes: list[Any] = await self.redis.zrange(self.names.lanes(target), 0, -1)
        if not lanes:
            return {}
        names = [_text(lane) for lane in lanes]
        pipe = self.redis.pipeline(transaction=False)
        for lane in names:
            pipe.zrange(self.names.lane(target, lane), 0, per_lane - 1, withscores=True)
        members = await pipe.execute()
        return {
            lane: [QueuedHead(_text(m[0]), float(m[1]), lane) for m in rows]
            for lane, rows in zip(names, members, strict=True)
            if rows
        }

    async def claim_many(self, plans: Sequence[ClaimPlan], now: float) -> list[Outcome]:
        """Run several claims in one round trip (each still atomic on its own)."""
        return await self._many("claim", [self._claim_call(plan, now) for plan in plans])

    def _claim_call(self, plan: ClaimPlan, now: float) -> tuple[list[str], list[Any]]:
        names, head, target = self.names, plan.head, plan.target
        keys = [
            names.run(head.run_id),
            names.queue(target),
            names.lane(target, head.lane),
            names.lanes(target),
            names.queue_deadlines,
            names.targets,
            names.machine_assigned(plan.machine_id),
            names.fence,
            names.outbox,
        ]
        args = [
            head.run_id,
            plan.machine_id,
            repr(now),
            head.mode,
            plan.user.casefold(),
            plan.slots,
            head.lane,
            target,
            timeline_entry("dispatched", now, {"machine_id": plan.machine_id}),
            plan.assignment_head,
        ]
        return keys, args

    async def record_reasons(
        self, target: str, waiting: dict[str, tuple[str, dict[str, str]]], now: float
    ) -> int:
        """Store why lane heads cannot be placed (lane -> (head run, reasons)); a change also
        goes into the head run's timeline. Two round trips whatever the number of lanes."""
        if not waiting:
            return 0
        lanes = list(waiting)
        previous = await self.redis.hmget(self.names.reasons(target), lanes)
        pipe = self.redis.pipeline(transaction=False)
        changed = 0
        for lane, old in zip(lanes, previous, strict=True):
            run_id, reasons = waiting[lane]
            if old is not None and json.loads(old).get("machines") == reasons:
                continue
            changed += 1
            pipe.hset(
                self.names.reasons(target), lane, fragment({"machines": reasons, "since": now})
            )
            self._scripts_note(pipe, run_id, timeline_entry("waiting", now, {"reasons": reasons}))
        if changed:
            await pipe.execute()
        return changed

    def _scripts_note(self, pipe: Any, run_id: str, entry: str) -> None:
        pipe.eval(_NOTE, 1, self.names.run(run_id), entry)

    async def claim(
        self,
        head: QueuedHead,
        target: str,
        *,
        machine_id: str,
        user: str,
        slots: int,
        assignment_head: str,
        now: float,
    ) -> Outcome:
        """Atomically hand a queued run to a machine with a new fencing token."""
        names = self.names
        return await self._run_script(
            "claim",
            [
                names.run(head.run_id),
                names.queue(target),
                names.lane(target, head.lane),
                names.lanes(target),
                names.queue_deadlines,
                names.targets,
                names.machine_assigned(machine_id),
                names.fence,
                names.outbox,
            ],
            [
                head.run_id,
                machine_id,
                repr(now),
                head.mode,
                user.casefold(),
                slots,
                head.lane,
                target,
                timeline_entry("dispatched", now, {"machine_id": machine_id}),
                assignment_head,
            ],
        )

    async def start(
        self,
        run_id: str,
        *,
        machine_id: str,
        fence: int,
        run_deadline: float,
        worker_id: str,
        now: float,
    ) -> Outcome:
        """The fenced start: succeeds for the current hand-off only (see start.lua)."""
        keys, args = self._start_call(
            run_id, fence, run_deadline, machine_id=machine_id, worker_id=worker_id, now=now
        )
        return await self._run_script("start", keys, args)

    def _start_call(
        self,
        run_id: str,
        fence: int,
        run_deadline: float,
        *,
        machine_id: str,
        worker_id: str,
        now: float,
    ) -> tuple[list[str], list[Any]]:
        keys = [self.names.run(run_id), self.names.outbox, self.names.running_deadlines]
        args = [
            run_id,
            machine_id,
            fence,
            repr(now),
            timeline_entry("started", now, {"machine_id": machine_id}),
            repr(run_deadline),
            worker_id,
        ]
        return keys, args

    async def start_many(
        self,
        starts: Sequence[tuple[str, int, float]],
        *,
        machine_id: str,
        worker_id: str,
        now: float,
    ) -> list[Outcome]:
        """Fenced starts of several runs (run id, fence, run deadline) in one round trip."""
        return await self._many(
            "start",
            [
                self._start_call(
                    run_id, fence, deadline, machine_id=machine_id, worker_id=worker_id, now=now
                )
                for run_id, fence, deadline in starts
            ],
        )

    async def _many(
        self, script: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Outcome]:
        """Several calls of one script in a pipeline (each atomic on its own)."""
        if not calls:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            await self._scripts[script](keys=keys, args=args, client=pipe)
        raw = await pipe.execute(raise_on_error=False)
        return [
            Outcome("error", (), (repr(item),)) if isinstance(item, Exception) else _outcome(item)
            for item in raw
        ]

    async def finish(
        self,
        run_id: str,
        *,
        machine_id: str,
        fence: int | None,
        allowed: Iterable[RunStatus],
        status: RunStatus,
        now: float,
        error: str = "",
        outputs: dict[str, Any] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Outcome:
        """End a dispatched or running run with ``status`` (fence-checked when given)."""
        ending = Ending(run_id, machine_id, fence, tuple(allowed), status, error, outputs, detail)
        keys, args = self._finish_call(ending, now)
        return await self._run_script("finish", keys, args)

    async def finish_many(self, endings: Sequence[Ending], now: float) -> list[Outcome]:
        """Several ends in one round trip."""
        return await self._many("finish", [self._finish_call(e, now) for e in endings])

    def _finish_call(self, ending: Ending, now: float) -> tuple[list[str], list[Any]]:
        keys = [
            self.names.run(ending.run_id),
            self.names.outbox,
            self.names.machine_assigned(ending.machine_id),
            self.names.running_deadlines,
            self.names.finished(ending.status),
        ]
        args = [
            ending.run_id,
            "" if ending.fence is None else ending.fence,
            " ".join(fragment(s.value) for s in ending.allowed),
            ending.status.value,
            ending.error,
            "" if ending.outputs is None else fragment(ending.outputs),
            repr(now),
            timeline_entry(ending.status.value, now, ending.detail),
            self.retention_s,
        ]
        return keys, args

    async def unqueue(
        self,
        run: Run,
        *,
        status: RunStatus,
        error: str,
        now: float,
        due_only: bool,
        detail: dict[str, Any] | None = None,
    ) -> Outcome:
        """End a queued run (deadline passed, cancelled, or failed before hand-off)."""
        names = self.names
        target = run.target or ""
        lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
        return await self._run_script(
            "unqueue",
            [
                names.run(run.run_id),
                names.queue(target),
                names.lane(target, lane),
                names.lanes(target),
                names.queue_deadlines,
                names.targets,
                names.outbox,
                names.finished(status),
            ],
            [
                run.run_id,
                status.value,
                error,
                repr(now),
                timeline_entry(status.value, now, detail),
                self.retention_s,
                lane,
                target,
                "1" if due_only else "0",
            ],
        )

    async def requeue(self, run: Run, *, reason: str, now: float) -> Outcome:
        """Put a dispatched run that never started back in its queue, at its old position."""
        names = self.names
        target = run.target or ""
        lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
        return await self._run_script(
            "requeue",
            [
                names.run(run.run_id),
                names.queue(target),
                names.lane(target, lane),
                names.lanes(target),
                names.queue_deadlines,
                names.targets,
                names.machine_assigned(run.machine_id or ""),
                names.outbox,
            ],
            [
                run.run_id,
                run.fence if run.fence is not None else "",
                timeline_entry("requeued", now, {"reason": reason, "machine_id": run.machine_id}),
                target,
            ],
        )

    async def reorder(
        self, run: Run, *, score: float, priority: Priority, event: str, now: float
    ) -> Outcome:
        """Give a queued run a new score (move to top) or priority (its lane changes)."""
        names = self.names
        target = run.target or ""
        old_lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
        new_lane = lane_of(run.connection_id, run.mode.value, priority.value)
        return await self._run_script(
            "reorder",
            [
                names.run(run.run_id),
                names.queue(target),
                names.lane(target, old_lane),
                names.lane(target, new_lane),
                names.lanes(target),
            ],
            [
                run.run_id,
                repr(score),
                old_lane,
                new_lane,
                fragment(priority.value),
                timeline_entry(event, now, {"priority": priority.value}),
            ],
        )

    # ---- reads --------------------------------------------------------------------------------
    async def get(self, run_id: str) -> Run | None:
        """The run record with its timeline, or None."""
        raw: Any = await self.redis.hgetall(self.names.run(run_id))
        if not raw:
            return None
        return parse_run(raw)

    async def get_many(self, run_ids: Sequence[str]) -> list[Run | None]:
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(self.names.run(run_id))
        return [parse_run(raw) if raw else None for raw in await pipe.execute()]

    async def score_of(self, run_id: str) -> float | None:
        raw = await self.redis.hget(self.names.run(run_id), "_score")
        return float(raw) if raw is not None else None

    async def position(self, run: Run) -> int | None:
        """1-based position of a queued run in its target's queue."""
        rank: Any = await self.redis.zrank(self.names.queue(run.target or ""), run.run_id)
        return None if rank is None else int(rank) + 1

    async def queue_page(self, target: str, start: int, stop: int) -> list[tuple[str, float]]:
        rows: list[Any] = await self.redis.zrange(
            self.names.queue(target), start, stop, withscores=True
        )
        return [(_text(row[0]), float(row[1])) for row in rows]

    async def targets(self) -> list[str]:
        return sorted(_text(t) for t in await self.redis.smembers(self.names.targets))

    async def due_deadlines(self, now: float, limit: int = 500) -> list[str]:
        rows = await self.redis.zrangebyscore(
            self.names.queue_deadlines, "-inf", now, start=0, num=limit
        )
        return [_text(r) for r in rows]

    async def overdue_running(self, now: float, limit: int = 500) -> list[str]:
        rows = await self.redis.zrangebyscore(
            self.names.running_deadlines, "-inf", now, start=0, num=limit
        )
        return [_text(r) for r in rows]

    async def finished_since(self, status: RunStatus, since: float, until: float) -> list[str]:
        rows = await self.redis.zrangebyscore(self.names.finished(status), since, until)
        return [_text(r) for r in rows]

    # ---- why waiting ----------------------------------------------------------------------------
    async def lane_reasons(self, target: str, lane: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.names.reasons(target), lane)
        return json.loads(raw) if raw else None

    async def note(self, run_id: str, event: str, now: float, detail: dict[str, Any]) -> None:
        """Append an event to a run's timeline (queue events such as changed reasons)."""
        await self.redis.eval(_NOTE, 1, self.names.run(run_id), timeline_entry(event, now, detail))

    # ---- outbox -------------------------------------------------------------------------------
    async def outbox_done(self, ids: Sequence[str]) -> None:
        if ids:
            await self.redis.xdel(self.names.outbox, *ids)

    async def outbox_older_than(self, age_s: float, count: int) -> list[OutboxMessage]:
        """Outbox entries nobody published (their writer died): for the relay."""
        cutoff_ms = int((time.time() - age_s) * 1000)
        rows: Any = await self.redis.xrange(self.names.outbox, "-", f"{cutoff_ms}", count=count)
        return [
            OutboxMessage(_text(entry_id), _text(f[b"k"]), _text(f[b"r"]), bytes(f[b"b"]))
            for entry_id, f in rows
        ]

    async def outbox_length(self) -> int:
        return int(await self.redis.xlen(self.names.outbox))


def parse_run(raw: dict[bytes, bytes]) -> Run:
    """Assemble a Run from its hash (the same splice the Lua scripts do)."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = _text(key)
        if name == "req":
            data.update(json.loads(value))
        elif name == "tl":
            data["timeline"] = json.loads(value)
        elif not name.startswith("_"):
            data[name] = json.loads(value)
    return Run.model_validate(data)


# ---- machines -----------------------------------------------------------------------------------
class MachineStore:
    """Live machine state: heartbeats, slots, offline marks."""

    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    async def record_heartbeat(
        self, heartbeat: Heartbeat, received_at: float
    ) -> tuple[Heartbeat | None, bool]:
        """Store a heartbeat; return the previous one and whether the machine was offline."""
        names = self.names
        pipe = self.redis.pipeline(transaction=False)
        pipe.getset(names.machine_live(heartbeat.machine_id), heartbeat.model_dump_json())
        pipe.zadd(names.heartbeat_index, {heartbeat.machine_id: received_at})
        pipe.hdel(names.offline_machines, heartbeat.machine_id)
        previous, _, was_offline = await pipe.execute()
        return (Heartbeat.model_validate_json(previous) if previous else None), bool(was_offline)

    async def views(
        self, machines: Sequence[Machine], now: float, offline_after_s: float
    ) -> list[MachineView]:
        """What selection needs about each machine, read in one round trip."""
        if not machines:
            return []
        names = self.names
        pipe = self.redis.pipeline(transaction=False)
        for machine in machines:
            pipe.zscore(names.heartbeat_index, machine.machine_id)
            pipe.get(names.machine_live(machine.machine_id))
            pipe.hgetall(names.machine_assigned(machine.machine_id))
        raw = await pipe.execute()
        views = []
        for index, machine in enumerate(machines):
            last_seen, live, assigned = raw[3 * index : 3 * index + 3]
            heartbeat = Heartbeat.model_validate_json(live) if live else None
            online = last_seen is not None and now - float(last_seen) <= offline_after_s
            views.append(
                MachineView(
                    machine=machine,
                    online=online,
                    offline_since=None
                    if online or last_seen is None
                    else float(last_seen) + offline_after_s,
                    sessions=heartbeat.sessions if heartbeat else (),
                    assigned=tuple(
                        AssignedRun.decode(_text(k), _text(v)) for k, v in assigned.items()
                    ),
                    has_public_key=bool(heartbeat and heartbeat.public_key),
                    public_key=heartbeat.public_key if heartbeat else None,
                )
            )
        return views

    async def stale(self, now: float, offline_after_s: float) -> list[str]:
        """Machines whose last heartbeat is older than ``offline_after_s``."""
        rows = await self.redis.zrangebyscore(
            self.names.heartbeat_index, "-inf", now - offline_after_s
        )
        return [_text(r) for r in rows]

    async def offline_marks(self) -> dict[str, float]:
        raw = await self.redis.hgetall(self.names.offline_machines)
        return {_text(k): float(v) for k, v in raw.items()}

    async def mark_offline(self, machine_id: str, since: float) -> bool:
        """True the first time a machine is marked offline (one replica wins)."""
        return bool(await self.redis.hsetnx(self.names.offline_machines, machine_id, since))

    async def assigned(self, machine_id: str) -> list[AssignedRun]:
        raw = await self.redis.hgetall(self.names.machine_assigned(machine_id))
        return [AssignedRun.decode(_text(k), _text(v)) for k, v in raw.items()]


_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


class Leases:
    """Short leases so that one replica at a time performs a singleton chore."""

    def __init__(self, redis: aioredis.Redis, names: Names, owner: str) -> None:
        self.redis = redis
        self.names = names
        self.owner = owner
        self._renew = redis.register_script(_RENEW)

    async def hold(self, role: str, ttl_s: float) -> bool:
        """Take or renew the lease for ``role``; True while this replica holds it."""
        return bool(
            await self._renew(keys=[self.names.lease(role)], args=[self.owner, int(ttl_s * 1000)])
        )
