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

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

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
        verdicts: list[Verdict] = []
        for message in batch:
            try:
                request = json.loads(message.body)
                op, machine_id = request["op"], str(request["machine_id"])
                correlation_id = str(request["correlation_id"])
                if op not in OPS:
                    raise ValueError(op)
            except (ValueError, KeyError, TypeError):
                self.metrics.dead_letter("schema")
                verdicts.append(DeadLetter("not a worker request", "schema"))
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
                verdicts.append(DeadLetter(reason, "sender"))
                continue
            try:
                results = await self._answer(op, machine_id, request)
            except (ValueError, KeyError, TypeError) as exc:
                self.metrics.dead_letter("schema")
                verdicts.append(DeadLetter(f"not a worker request: {exc!r}"[:200], "schema"))
                continue
            body = json.dumps({"correlation_id": correlation_id, "results": results}).encode()
            await self.broker.publish_json(
                "machines", self.names.replies_key(machine_id), body, kind="reply", mandatory=False
            )
            verdicts.append(Ack())
        return verdicts

    async def _answer(
        self, op: str, machine_id: str, request: dict[str, Any]
    ) -> list[dict[str, Any]]:
        now = self.clock()
        if op == "start":
            worker_id = str(request["worker_id"])
            starts = [
                Start(
                    str(s["run_id"]), int(s["fence"]), float(s["deadline"]), machine_id, worker_id
                )
                for s in request["starts"]
            ]
            # The flows start at once; the started events follow (in the outbox already).
            async with self.lifecycle.window(wait=False) as window:
                started = await window.start_many(starts, now)
            return [encode_start_result(r) for r in started]
        if op == "finish":
            endings = [
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
            async with self.lifecycle.window() as window:
                finished = await window.finish_many(endings, now)
            return [encode_finish_result(r) for r in finished]
        if op == "states":
            states = await self.runs.states([str(r) for r in request["run_ids"]])
            return [
                {
                    "status": s.status and s.status.value,
                    "fence": s.fence,
                    "machine_id": s.machine_id,
                }
                for s in states
            ]
        assigned = await self.machines.assigned(machine_id)
        runs = await self.runs.get_many([a.run_id for a in assigned])
        return [
            {"run_id": run.run_id, "fence": run.fence or 0}
            for run in runs
            if run is not None and run.status is RunStatus.running
        ]


def decode_state(data: dict[str, Any]) -> RunState:
    return RunState(_status(data.get("status")), data.get("fence"), data.get("machine_id"))
