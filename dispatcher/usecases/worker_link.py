"""The dispatcher's side of the workers' link: fenced starts, outcomes and queries arrive as
messages on ``<ns>.reports``; the dispatcher runs the transitions and answers on the machine's
replies queue. Workers hold no Redis credentials.

    worker ─▶ <ns>.reports {op, machine_id, worker_id, correlation_id, ...}
           ◀─ <ns>.machines, key <machine>.replies {correlation_id, results}

A request is accepted only from the machine's own identity (or the dispatcher's): anything else
is dead-lettered (``sender``) and counted. ``start`` is idempotent for the worker that started
the run (``start.lua``), so a worker whose answer was lost asks again and gets ``Started``.
The wire format (``encode_*`` / ``decode_*``) is shared with the worker's adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dispatcher.core.principals import admin_user_of, publisher_of, sender_of
from dispatcher.metrics.hooks import MetricsHooks
from dispatcher.models import RunError, RunStatus
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.ports import (
    Ack,
    Broker,
    DeadLetter,
    Delivery,
    Ending,
    MachineState,
    RunReads,
    Start,
    Verdict,
)
from dispatcher.usecases.results import (
    Conflict,
    Failed,
    Finished,
    FinishResult,
    Missing,
    Refused,
    RunState,
    Stale,
    Started,
    StartResult,
)

log = logging.getLogger(__name__)

OPS = ("start", "finish", "states", "running")


# ---- the wire format --------------------------------------------------------------------------
def _status(value: Any) -> RunStatus | None:
    return RunStatus(value) if value else None


def encode_start_result(result: StartResult) -> dict[str, Any]:
    match result:
        case Started():
            return {"result": "started"}
        case Refused(status=status, fence=fence):
            return {"result": "refused", "status": status and status.value, "fence": fence}
        case Failed(error=error):
            return {"result": "failed", "error": error}
    raise TypeError(result)


def decode_start_result(data: dict[str, Any]) -> StartResult:
    match data.get("result"):
        case "started":
            return Started()
        case "refused":
            return Refused(status=_status(data.get("status")), fence=data.get("fence"))
    return Failed(error=str(data.get("error") or "no answer"))


def encode_finish_result(result: FinishResult) -> dict[str, Any]:
    match result:
        case Finished():
            return {"result": "finished"}
        case Missing():
            return {"result": "missing"}
        case Stale(status=status, fence=fence):
            return {"result": "stale", "status": status and status.value, "fence": fence}
        case Conflict(status=status):
            return {"result": "conflict", "status": status and status.value}
        case Failed(error=error):
            return {"result": "failed", "error": error}
    raise TypeError(result)


def decode_finish_result(data: dict[str, Any]) -> FinishResult:
    match data.get("result"):
        case "finished":
            return Finished()
        case "missing":
            return Missing()
        case "stale":
            return Stale(status=_status(data.get("status")), fence=data.get("fence"))
        case "conflict":
            return Conflict(status=_status(data.get("status")))
    return Failed(error=str(data.get("error") or "no answer"))


def encode_outcome(
    run_id: str,
    fence: int,
    status: RunStatus,
    error: RunError | None,
    outputs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "fence": fence,
        "status": status.value,
        "error": error.model_dump(mode="json") if error else None,
        "outputs": outputs,
    }


_R = TypeVar("_R")


# ---- the dispatcher's side --------------------------------------------------------------------
class WorkerRequests:
    """Handles batches of ``<ns>.reports``."""

    def __init__(
        self,
        *,
        settings: Settings,
        broker: Broker,
        lifecycle: Lifecycle,
        runs: RunReads,
        machines: MachineState,
        metrics: MetricsHooks,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.admin_user = admin_user_of(settings.amqp_url.get_secret_value())
        self.broker = broker
        self.lifecycle = lifecycle
        self.runs = runs
        self.machines = machines
        self.metrics = metrics
        self.clock = clock

    async def handle(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Answer a batch of requests. The batch's starts are recorded in one window and its
        outcomes in another, each group answered as soon as it is done: a worker waits for its
        answer before it starts a flow, so answering one request after the other would make
        every worker wait for every other worker's round trips."""
        verdicts: list[Verdict] = [Ack() for _ in batch]
        asked: list[tuple[int, _Asked]] = []
        for index, message in enumerate(batch):
            try:
                request = json.loads(message.body)
                op, machine_id = request["op"], str(request["machine_id"])
                correlation_id = str(request["correlation_id"])
                if op not in OPS:
                    raise ValueError(op)
                changes = self._changes(op, machine_id, request)
            except (ValueError, KeyError, TypeError) as exc:
                self.metrics.dead_letter("schema")
                verdicts[index] = DeadLetter(f"not a worker request: {exc!r}"[:200], "schema")
                continue
            user = publisher_of(self.admin_user, message.user_id, message.headers)
            sender = sender_of(self.names, self.admin_user, user)
            if not sender.speaks_for_machine(machine_id):
                reason = (
                    f"a {op} request for machine {machine_id} from "
                    f"{sender.describe(user)}, which may not speak for it"
                )
                log.warning("refused %s", reason)
                self.metrics.message_refused("sender")
                self.metrics.dead_letter("sender")
                verdicts[index] = DeadLetter(reason, "sender")
                continue
            asked.append((index, _Asked(op, machine_id, correlation_id, request, changes)))
        await self._answer_all([a for _, a in asked])
        return verdicts

    def _changes(self, op: str, machine_id: str, request: dict[str, Any]) -> list[Any]:
        """The transitions a start or finish request asks for (read before anything is done,
        so that a malformed request is dead-lettered alone)."""
        if op == "start":
            worker_id = str(request["worker_id"])
            return [
                Start(
                    str(s["run_id"]), int(s["fence"]), float(s["deadline"]), machine_id, worker_id
                )
                for s in request["starts"]
            ]
        if op == "finish":
            return [
                Ending(
                    run_id=str(o["run_id"]),
                    machine_id=machine_id,
                    fence=int(o["fence"]),
                    allowed=(RunStatus.running,),
                    status=RunStatus(o["status"]),
                    error=RunError.model_validate(o["error"]) if o.get("error") else None,
                    outputs=o.get("outputs"),
                )
                for o in request["outcomes"]
            ]
        if op == "states":
            return [str(r) for r in request["run_ids"]]
        return []

    async def _answer_all(self, asked: Sequence[_Asked]) -> None:
        """Answer every request: the batch's starts in one window, then its outcomes in
        another, then the queries side by side. A worker waits for its start answer before it
        runs a flow, so the start answers go out as soon as the starts are recorded, while the
        outcomes' window and its confirms are under way (waiting for them was a round trip of
        confirms on every start). A failure of the starts stops the batch before the
        outcomes, as before: the consumer handles the whole batch again."""
        now = self.clock()
        starts = [a for a in asked if a.op == "start"]
        finishes = [a for a in asked if a.op == "finish"]
        queries = [a for a in asked if a.op in ("states", "running")]
        answered: asyncio.Task[None] | None = None
        if starts:
            async with self.lifecycle.window(wait=False) as window:
                started = await window.start_many([c for a in starts for c in a.changes], now)
            answers = [[encode_start_result(r) for r in part] for part in _split(started, starts)]
            answered = asyncio.create_task(self._reply(starts, answers))
        try:
            await self._answer_finishes(finishes, now)
            await asyncio.gather(*(self._answer_query(a) for a in queries))
        finally:
            if answered is not None:
                await answered

    async def _answer_finishes(self, asked: Sequence[_Asked], now: float) -> None:
        """Every outcome in one window, answered once its events are confirmed."""
        if not asked:
            return
        async with self.lifecycle.window() as window:
            ended = await window.finish_many([c for a in asked for c in a.changes], now)
        await self._reply(
            asked, [[encode_finish_result(r) for r in part] for part in _split(ended, asked)]
        )

    async def _answer_query(self, asked: _Asked) -> None:
        await self._reply([asked], [await self._query(asked)])

    async def _reply(
        self, asked: Sequence[_Asked], answers: Sequence[list[dict[str, Any]]]
    ) -> None:
        await self.broker.publish_many_json(
            "machines",
            [
                (
                    self.names.replies_key(a.machine_id),
                    json.dumps({"correlation_id": a.correlation_id, "results": results}).encode(),
                )
                for a, results in zip(asked, answers, strict=True)
            ],
            kind="reply",
            mandatory=False,
        )

    async def _query(self, asked: _Asked) -> list[dict[str, Any]]:
        if asked.op == "states":
            states = await self.runs.states(asked.changes)
            return [
                {
                    "status": s.status and s.status.value,
                    "fence": s.fence,
                    "machine_id": s.machine_id,
                }
                for s in states
            ]
        assigned = await self.machines.assigned(asked.machine_id)
        runs = await self.runs.get_many([a.run_id for a in assigned])
        return [
            {"run_id": run.run_id, "fence": run.fence or 0}
            for run in runs
            if run is not None and run.status is RunStatus.running
        ]


@dataclass(frozen=True)
class _Asked:
    """One accepted request: what it asks and where its answer goes."""

    op: str
    machine_id: str
    correlation_id: str
    request: dict[str, Any]
    changes: list[Any]


def _split(results: Sequence[_R], asked: Sequence[_Asked]) -> list[list[_R]]:
    """Cut the results of one window back into the requests they were asked by."""
    parts, at = [], 0
    for a in asked:
        n = len(a.changes)
        parts.append(list(results[at : at + n]))
        at += n
    return parts


def decode_state(data: dict[str, Any]) -> RunState:
    return RunState(_status(data.get("status")), data.get("fence"), data.get("machine_id"))
