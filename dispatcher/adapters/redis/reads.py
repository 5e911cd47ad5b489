"""Reads of runs and queues in Redis (``RunReads``): records, positions, lane heads, due
deadlines. None of them locks: a decision made on them is checked again by the transition
(a Lua script) that acts on it."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import fence_of, parse_run, status_of, text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.models import QueuedHead, Run, RunStatus
from dispatcher.names import Names
from dispatcher.usecases.results import RunState

# What ``briefs`` reads of a run: no timeline (the bulk of a record).
BRIEF_FIELDS = (
    "req", "status", "priority", "target", "connection_kind", "queued_at", "queue_deadline",
    "dispatched_at",
)  # fmt: skip


@store_adapter
class RedisRunReads:
    """What the use cases, the CLI and the client read about runs and queues."""

    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    # ---- runs ---------------------------------------------------------------------------------
    async def get(self, run_id: str) -> Run | None:
        """The run record with its timeline, or None."""
        raw: Any = await self.redis.hgetall(self.names.run(run_id))
        return parse_run(raw) if raw else None

    async def get_many(self, run_ids: Sequence[str]) -> list[Run | None]:
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(self.names.run(run_id))
        return [parse_run(raw) if raw else None for raw in await pipe.execute()]

    async def briefs(self, run_ids: Sequence[str]) -> list[Run | None]:
        """Several runs without their timeline, inputs and outputs (the forecast's reads)."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self.names.run(run_id), *BRIEF_FIELDS)
        briefs: list[Run | None] = []
        for values in await pipe.execute():
            if values[0] is None:
                briefs.append(None)
                continue
            fields = {k: v for k, v in zip(BRIEF_FIELDS, values, strict=True) if v is not None}
            briefs.append(parse_run(fields))
        return briefs

    async def states(self, run_ids: Sequence[str]) -> list[RunState]:
        """Status, fence and machine of several runs, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(self.names.run(run_id), "status", "fence", "machine_id")
        return [
            RunState(status_of(status), fence_of(fence), json.loads(machine) if machine else None)
            for status, fence, machine in await pipe.execute()
        ]

    async def score_of(self, run_id: str) -> float | None:
        raw = await self.redis.hget(self.names.run(run_id), "_score")
        return float(raw) if raw is not None else None

    # ---- queues -------------------------------------------------------------------------------
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
        """The targets that have queued runs."""
        return sorted(text(t) for t in await self.redis.smembers(self.names.targets))

    async def lane_names(self, target: str) -> list[str]:
        """The lanes of a target that hold queued runs."""
        return [text(lane) for lane in await self.redis.zrange(self.names.lanes(target), 0, -1)]

    async def lane_members(
        self, target: str, lanes: list[str], per_lane: int, heads_only: Collection[str] = ()
    ) -> dict[str, list[QueuedHead]]:
        """The first ``per_lane`` runs of each of a target's ``lanes`` (one round trip); only
        the first of the lanes in ``heads_only``."""
        if not lanes:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            last = 0 if lane in heads_only else per_lane - 1
            pipe.zrange(self.names.lane(target, lane), 0, last, withscores=True)
        members = await pipe.execute()
        return {
            lane: [QueuedHead(text(m[0]), float(m[1]), lane) for m in rows]
            for lane, rows in zip(lanes, members, strict=True)
            if rows
        }

    async def lane_reasons(self, target: str, lane: str) -> dict[str, Any] | None:
        """Why the lane's head waits, as the last placement pass recorded it."""
        raw = await self.redis.hget(self.names.reasons(target), lane)
        return json.loads(raw) if raw else None

    # ---- indexes ------------------------------------------------------------------------------
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
