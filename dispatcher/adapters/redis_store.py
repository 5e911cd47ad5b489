"""The run store: runs, queues, lanes, deadlines and machine slots in Redis.

Every state change is one Lua script (``lua/*.lua``) so that it is atomic across dispatcher
replicas and workers, and each script records the messages it implies (events, assignments)
in the outbox stream in the same step: a crash between the change and its publication loses
nothing, the outbox relay publishes it later.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from dispatcher.adapters.records import (
    NOTE_SCRIPT,
    ClaimPlan,
    Ending,
    OutboxMessage,
    Outcome,
    QueuedHead,
    error_fragment,
    fragment,
    load_scripts,
    outcome_of,
    parse_run,
    text,
    timeline_entry,
)
from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.models import Priority, Run, RunRequest, RunStatus
from dispatcher.names import Names


class RunStore:
    """Atomic operations on runs. Shared by dispatcher replicas, workers and the CLI."""

    def __init__(self, redis: aioredis.Redis, names: Names, retention_s: float) -> None:
        self.redis = redis
        self.names = names
        self.retention_s = int(retention_s)
        self._scripts = {
            name: redis.register_script(source) for name, source in load_scripts().items()
        }
        self._pending: dict[str, list[tuple[list[str], list[Any], asyncio.Future[Any]]]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def _run_script(self, name: str, keys: list[str], args: list[Any]) -> Outcome:
        """Run one script call. Calls made in the same turn of the event loop (a batch of
        requests handled concurrently, say) share one pipeline: one round trip for all."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._pending.setdefault(name, [])
        pending.append((keys, args, future))
        if len(pending) == 1:
            loop.call_soon(self._send_pending, name)
        return outcome_of(await future)

    def _send_pending(self, name: str) -> None:
        calls = self._pending.pop(name, [])
        task = asyncio.create_task(self._send(name, calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, name: str, calls: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        try:
            raw = await self._evalsha_many(name, [(keys, args) for keys, args, _ in calls])
        except BaseException as exc:
            for _, _, future in calls:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), item in zip(calls, raw, strict=True):
            if future.done():
                continue
            if isinstance(item, Exception):
                future.set_exception(item)
            else:
                future.set_result(item)

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
    async def lane_names(self, target: str) -> list[str]:
        """The lanes of a target that hold queued runs."""
        return [text(lane) for lane in await self.redis.zrange(self.names.lanes(target), 0, -1)]

    async def lane_members(
        self, target: str, lanes: list[str], per_lane: int
    ) -> dict[str, list[QueuedHead]]:
        """The first ``per_lane`` runs of each of a target's ``lanes`` (one round trip)."""
        if not lanes:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.zrange(self.names.lane(target, lane), 0, per_lane - 1, withscores=True)
        members = await pipe.execute()
        return {
            lane: [QueuedHead(text(m[0]), float(m[1]), lane) for m in rows]
            for lane, rows in zip(lanes, members, strict=True)
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
        pipe.eval(NOTE_SCRIPT, 1, self.names.run(run_id), entry)

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
        raw = await self._evalsha_many(script, calls)
        return [
            Outcome("error", (), (repr(item),)) if isinstance(item, Exception) else outcome_of(item)
            for item in raw
        ]

    async def _evalsha_many(
        self, script: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """EVALSHA straight into a pipeline: registering the script with it would cost a
        SCRIPT EXISTS round trip per batch. A server that lost its scripts (a restart)
        answers NOSCRIPT: load the script and run those calls again."""
        sha = self._scripts[script].sha
        raw = await self._pipeline_evalsha(sha, calls)
        missing = [i for i, item in enumerate(raw) if isinstance(item, NoScriptError)]
        if missing:
            await self.redis.script_load(self._scripts[script].script)
            again = await self._pipeline_evalsha(sha, [calls[i] for i in missing])
            for index, item in zip(missing, again, strict=True):
                raw[index] = item
        return raw

    async def _pipeline_evalsha(
        self, sha: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

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
        target, lane, keys = self._queue_keys(run)
        return await self._run_script(
            "unqueue",
            [*keys, self.names.outbox, self.names.finished(status)],
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

    def _queue_keys(self, run: Run) -> tuple[str, str, list[str]]:
        """Target, lane and the keys of a run's place in its queue (the scripts' first six)."""
        names = self.names
        target = run.target or ""
        lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
        keys = [
            names.run(run.run_id),
            names.queue(target),
            names.lane(target, lane),
            names.lanes(target),
            names.queue_deadlines,
            names.targets,
        ]
        return target, lane, keys

    async def requeue(self, run: Run, *, reason: str, now: float) -> Outcome:
        """Put a dispatched run that never started back in its queue, at its old position."""
        target, _, keys = self._queue_keys(run)
        return await self._run_script(
            "requeue",
            [*keys, self.names.machine_assigned(run.machine_id or ""), self.names.outbox],
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

    async def states(
        self, run_ids: Sequence[str]
    ) -> list[tuple[str | None, int | None, str | None]]:
        """(status, fence, machine id) of several runs, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self.names.run(run_id), "status", "fence", "machine_id")
        result = []
        for status, fence, machine in await pipe.execute():
            result.append(
                (
                    json.loads(status) if status else None,
                    int(fence) if fence else None,
                    json.loads(machine) if machine else None,
                )
            )
        return result

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
        return [(text(row[0]), float(row[1])) for row in rows]

    async def targets(self) -> list[str]:
        return sorted(text(t) for t in await self.redis.smembers(self.names.targets))

    async def due_deadlines(self, now: float, limit: int = 500) -> list[str]:
        rows = await self.redis.zrangebyscore(
            self.names.queue_deadlines, "-inf", now, start=0, num=limit
        )
        return [text(r) for r in rows]

    async def overdue_running(self, now: float, limit: int = 500) -> list[str]:
        rows = await self.redis.zrangebyscore(
            self.names.running_deadlines, "-inf", now, start=0, num=limit
        )
        return [text(r) for r in rows]

    async def finished_since(self, status: RunStatus, since: float, until: float) -> list[str]:
        rows = await self.redis.zrangebyscore(self.names.finished(status), since, until)
        return [text(r) for r in rows]

    # ---- why waiting ----------------------------------------------------------------------------
    async def lane_reasons(self, target: str, lane: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.names.reasons(target), lane)
        return json.loads(raw) if raw else None

    async def note(self, run_id: str, event: str, now: float, detail: dict[str, Any]) -> None:
        """Append an event to a run's timeline (queue events such as changed reasons)."""
        await self.redis.eval(
            NOTE_SCRIPT, 1, self.names.run(run_id), timeline_entry(event, now, detail)
        )

    # ---- outbox -------------------------------------------------------------------------------
    async def outbox_done(self, ids: Sequence[str]) -> None:
        if ids:
            await self.redis.xdel(self.names.outbox, *ids)

    async def outbox_older_than(self, age_s: float, count: int) -> list[OutboxMessage]:
        """Outbox entries nobody published (their writer died): for the relay."""
        cutoff_ms = int((time.time() - age_s) * 1000)
        rows: Any = await self.redis.xrange(self.names.outbox, "-", f"{cutoff_ms}", count=count)
        return [
            OutboxMessage(text(entry_id), text(f[b"k"]), text(f[b"r"]), bytes(f[b"b"]))
            for entry_id, f in rows
        ]

    async def outbox_length(self) -> int:
        return int(await self.redis.xlen(self.names.outbox))
