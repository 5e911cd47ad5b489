"""The run store's transitions in Redis (``RunTransitions``): one Lua script each, answering a
typed result.

Each script records the messages its change implies (events, assignments, cancels) in the
outbox stream in the same atomic step: a crash between the change and its publication loses
nothing, the outbox relay publishes it later. Encodings and argument order live in
:mod:`~dispatcher.adapters.redis.codec`; how scripts are sent in :mod:`.scripts`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis.asyncio as aioredis

from dispatcher.adapters.redis import codec, replies
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.adapters.redis.scripts import NOTE_SCRIPT, ScriptRunner
from dispatcher.models import Priority, Run
from dispatcher.names import Names
from dispatcher.usecases.ports import (
    Admission,
    Adoption,
    Claim,
    Ending,
    HandoffFacts,
    QueueEnding,
    Refusal,
    Start,
)
from dispatcher.usecases.results import (
    AdmitResult,
    CancelResult,
    ClaimResult,
    FinishResult,
    RejectResult,
    ReorderResult,
    RequeueResult,
    StartResult,
    UnqueueResult,
)


@store_adapter
class RedisTransitions:
    """Atomic, fenced changes of runs. Shared by dispatcher replicas, workers and the CLI."""

    def __init__(self, redis: aioredis.Redis, names: Names, retention_s: float) -> None:
        self.redis = redis
        self.names = names
        self.calls = codec.Calls(names, retention_s)
        self.scripts = ScriptRunner(redis)

    # ---- admission ----------------------------------------------------------------------------
    async def admit(self, admission: Admission) -> AdmitResult:
        """Queue a run, or report it as duplicate or rejected (throttled, queue full)."""
        return replies.admit_result(await self.scripts.run("admit", self.calls.admit(admission)))

    async def reject(self, refusal: Refusal) -> RejectResult:
        """Record a run rejected at admission (a duplicate run id keeps the existing run)."""
        raw = await self.scripts.run("reject", self.calls.reject(refusal))
        return replies.reject_result(raw, refusal.code)

    # ---- hand-off and outcome -----------------------------------------------------------------
    async def reserve_handoffs(self, run_ids: Sequence[str]) -> list[HandoffFacts | None]:
        """Fencing tokens for the coming claims (one INCRBY) and the runs' requests, in one
        round trip. A token reserved for a claim that is not made is simply never used."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(self.names.fence, len(run_ids))
        for run_id in run_ids:
            pipe.hget(self.names.run(run_id), "req")
        last, *requests = await pipe.execute()
        first = int(last) - len(run_ids) + 1
        return [codec.handoff_facts(first + index, raw) for index, raw in enumerate(requests)]

    async def claim_many(self, claims: Sequence[Claim], now: float) -> list[ClaimResult]:
        """Several claims in one round trip (each atomic on its own; see claim.lua)."""
        raw = await self.scripts.run_many("claim", [self.calls.claim(c, now) for c in claims])
        return [replies.claim_result(item) for item in raw]

    async def start_many(self, starts: Sequence[Start], now: float) -> list[StartResult]:
        """Fenced starts in one round trip: each succeeds for the current hand-off only."""
        raw = await self.scripts.run_many("start", [self.calls.start(s, now) for s in starts])
        return [replies.start_result(item) for item in raw]

    async def adopt_many(self, adoptions: Sequence[Adoption], now: float) -> list[StartResult]:
        """Runs workers report running while the store lost their claim and start (see
        adopt.lua): each becomes running on the reporting machine, in one round trip."""
        raw = await self.scripts.run_many("adopt", [self.calls.adopt(a, now) for a in adoptions])
        return [replies.start_result(item) for item in raw]

    async def finish_many(self, endings: Sequence[Ending], now: float) -> list[FinishResult]:
        """Several ends of dispatched or running runs in one round trip (fence-checked)."""
        raw = await self.scripts.run_many("finish", [self.calls.finish(e, now) for e in endings])
        return [replies.finish_result(item) for item in raw]

    # ---- queue changes ------------------------------------------------------------------------
    async def unqueue(self, run: Run, ending: QueueEnding, now: float) -> UnqueueResult:
        """End a queued run (deadline passed, cancelled, or failed before hand-off)."""
        raw = await self.scripts.run("unqueue", self.calls.unqueue(run, ending, now))
        return replies.unqueue_result(raw)

    async def requeue(self, run: Run, *, reason: str, now: float) -> RequeueResult:
        """Put a dispatched run that never started back in its queue, at its old position."""
        raw = await self.scripts.run("requeue", self.calls.requeue(run, reason, now))
        return replies.requeue_result(raw)

    async def reorder(
        self, run: Run, *, score: float, priority: Priority, event: str, now: float
    ) -> ReorderResult:
        """Give a queued run a new score (move to top) or priority (its lane changes)."""
        raw = await self.scripts.run(
            "reorder", self.calls.reorder(run, score, priority, event, now)
        )
        return replies.reorder_result(raw)

    async def request_cancel(self, run: Run, *, reason: str, now: float) -> CancelResult:
        """Mark a running run ``cancel_requested`` and record the cancel for its worker."""
        raw = await self.scripts.run("cancel", self.calls.request_cancel(run, reason, now))
        return replies.cancel_result(raw)

    # ---- why waiting, indexes -----------------------------------------------------------------
    async def record_reasons(
        self, target: str, waiting: dict[str, tuple[str, dict[str, str]]], now: float
    ) -> int:
        """Store why lane heads cannot be placed (lane -> (head run, reasons)); a change also
        goes into the head run's timeline. Two round trips whatever the number of lanes."""
        if not waiting:
            return 0
        lanes = list(waiting)
        key = self.names.reasons(target)
        previous = await self.redis.hmget(key, lanes)
        pipe = self.redis.pipeline(transaction=False)
        changed = 0
        for lane, old in zip(lanes, previous, strict=True):
            run_id, reasons = waiting[lane]
            if old is not None and json.loads(old).get("machines") == reasons:
                continue
            changed += 1
            pipe.hset(key, lane, codec.fragment({"machines": reasons, "since": now}))
            entry = codec.timeline_entry("waiting", now, {"reasons": reasons})
            pipe.eval(NOTE_SCRIPT, 1, self.names.run(run_id), entry)
        if changed:
            await pipe.execute()
        return changed

    async def forget_deadline(self, run_id: str) -> None:
        await self.redis.zrem(self.names.queue_deadlines, run_id)

    async def forget_running(self, run_id: str) -> None:
        await self.redis.zrem(self.names.running_deadlines, run_id)
