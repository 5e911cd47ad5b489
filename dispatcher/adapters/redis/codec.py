"""Every encoding of the run store, in one place: the run record's JSON fragments, timeline
entries, errors, the assignment a worker receives, the ``assigned:<machine>`` values and the
scripts' argument order.

A run is a hash whose values are JSON fragments; the Lua scripts splice them into the record's
JSON, so none of them parses JSON (:func:`record_json` is the same splice in Python). What the
scripts answer becomes a typed result in :mod:`.replies`.
"""

from __future__ import annotations

import json
from typing import Any

from dispatcher.codes import ErrorCode
from dispatcher.core.ordering import lane_of
from dispatcher.models import AssignedRun, Mode, Priority, Run, RunError, RunRequest, RunStatus
from dispatcher.names import NO_SUBMITTER, Names
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

Call = tuple[list[str], list[Any]]  # (KEYS, ARGV) of one script call


# ---- fragments --------------------------------------------------------------------------------
def fragment(value: Any) -> str:
    """A value as the JSON fragment stored in a run hash field."""
    return json.dumps(value, separators=(",", ":"))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def timeline_entry(event: str, at: float, detail: dict[str, Any] | None = None) -> str:
    entry: dict[str, Any] = {"at": at, "event": event}
    if detail:
        entry["detail"] = detail
    return fragment(entry)


def error_fragment(error: RunError) -> str:
    value: dict[str, Any] = {"code": error.code.value, "message": error.message}
    if error.detail is not None:
        value["detail"] = error.detail
    return fragment(value)


def request_fields(request: RunRequest, now: float, submitter: str = NO_SUBMITTER) -> list[str]:
    """The immutable part of a run record, as field/value pairs (``_sub``: who submitted it,
    the last word of its events' routing keys; internal, not in the record)."""
    submitted = request.submitted_at.timestamp() if request.submitted_at else now
    req = request.model_dump(mode="json", exclude={"priority", "submitted_at"})
    req["submitted_at"] = submitted
    if not request.fail_early:
        del req["fail_early"]  # the record of a run that did not ask for it is unchanged
    return ["req", fragment(req), "priority", fragment(request.priority.value), "_sub", submitter]


def status_of(raw: Any) -> RunStatus | None:
    """A status fragment (``"queued"`` with its quotes) as read from the hash; None: no run."""
    value = text(raw) if raw is not None else "null"
    return None if value in ("null", "") else RunStatus(json.loads(value))


def fence_of(raw: Any) -> int | None:
    value = text(raw) if raw is not None else "null"
    return None if value in ("null", "") else int(value)


# ---- records ------------------------------------------------------------------------------------
def record_json(fields: dict[str, str], with_timeline: bool = False) -> str:
    """The record's JSON from its hash fields: the same splice as ``record_json`` in
    ``lua/common.lua`` (the request's fields, then every other public field in hash order)."""
    req = "{}"
    parts: list[str] = []
    for name, value in fields.items():
        if name == "req":
            req = value
        elif name == "tl":
            if with_timeline:
                parts.append('"timeline":' + value)
        elif not name.startswith("_"):
            parts.append(f'"{name}":{value}')
    inner = req[1:-1]
    if not parts:
        return req
    if not inner:
        return "{" + ",".join(parts) + "}"
    return "{" + inner + "," + ",".join(parts) + "}"


def parse_run(raw: dict[bytes, bytes] | dict[str, str]) -> Run:
    """Assemble a Run from its hash (the same splice the Lua scripts do)."""
    data: dict[str, Any] = {}
    for key, value in raw.items():
        name = text(key)
        if name == "req":
            data.update(json.loads(value))
        elif name == "tl":
            data["timeline"] = json.loads(value)
        elif not name.startswith("_"):
            data[name] = json.loads(value)
    return Run.model_validate(data)


# ---- the hand-off --------------------------------------------------------------------------
def assignment_head(claim: Claim) -> str:
    """The assignment's fields the dispatcher knows before the claim, as JSON members: the
    claim script puts the fencing token before them and the stored request after them."""
    return ",".join(
        f'"{key}":{fragment(value)}'
        for key, value in (
            ("machine_id", claim.machine_id),
            ("mode", claim.head.mode),
            ("user", claim.user),
            ("connection_kind", claim.connection_kind.value),
            ("max_run_s", claim.max_run_s),
            ("sealed_secret", claim.sealed_secret),
        )
    )


def handoff_facts(fence: int, request_json: Any) -> HandoffFacts | None:
    """What the sealed secret binds, from the stored request (the one the assignment carries)."""
    if request_json is None:
        return None
    request = json.loads(text(request_json))
    inputs = request.get("inputs") or {}
    return HandoffFacts(fence, str(request["flow_id"]), inputs if isinstance(inputs, dict) else {})


def assignment_json(fence: int, head: str, request_json: str) -> str:
    """The assignment a worker receives (``models.Assignment``): the splice claim.lua does."""
    return '{"fence":' + str(fence) + "," + head + ',"request":' + request_json + "}"


def encode_assigned(mode: str, fence: int, user: str) -> str:
    """The value of a run in ``assigned:<machine>``: ``mode|fence|user`` (user case-folded)."""
    return f"{mode}|{fence}|{user}"


def decode_assigned(run_id: str, value: str) -> AssignedRun:
    mode, fence, user = value.split("|", 2)
    return AssignedRun(run_id=run_id, mode=Mode(mode), user=user, fence=int(fence))


def cancel_body(run_id: str, fence: int | None, reason: str) -> bytes:
    """What a worker receives to stop a running run (cancel.lua builds the same JSON)."""
    return json.dumps({"run_id": run_id, "fence": fence, "reason": reason}).encode()


# ---- script calls: the argument order of each lua/*.lua ---------------------------------------
class Calls:
    """Builds each script's KEYS and ARGV (documented at the top of each script)."""

    def __init__(self, names: Names, retention_s: float) -> None:
        self.names = names
        self.retention_s = int(retention_s)

    def admit(self, admission: Admission) -> Call:
        names, request, target, now = self.names, admission.request, admission.target, admission.now
        lane = lane_of(request.connection_id, request.mode.value, request.priority.value)
        keys = [
            names.run(request.run_id),
            names.queue(target),
            names.lane(target, lane),
            names.lanes(target),
            names.queue_deadlines,
            names.targets,
            names.throttle(request.connection_id, int(now // 60)),
            names.outbox,
            names.finished(RunStatus.rejected),
        ]
        throttled = RunError(
            code=ErrorCode.DesktopFlowsActionThrottled,
            message=f"more than {admission.throttle_limit} runs per minute on this connection",
        )
        full = RunError(code=ErrorCode.QueueFull, message=f"the queue of {target} is full")
        args = [
            request.run_id,
            repr(admission.score),
            repr(admission.deadline),
            lane,
            target,
            admission.throttle_limit,
            admission.queue_cap,
            repr(now),
            timeline_entry("queued", now, {"target": target}),
            self.retention_s,
            error_fragment(throttled),
            error_fragment(full),
            timeline_entry("rejected", now),
            *request_fields(request, now, admission.submitter),
            "target",
            fragment(target),
            "connection_kind",
            fragment(admission.connection_kind.value),
        ]
        return keys, args

    def reject(self, refusal: Refusal) -> Call:
        names, request, now = self.names, refusal.request, refusal.now
        extra = (["target", fragment(refusal.target)] if refusal.target is not None else []) + (
            ["connection_kind", fragment(refusal.connection_kind.value)]
            if refusal.connection_kind is not None
            else []
        )
        keys = [names.run(request.run_id), names.outbox, names.finished(RunStatus.rejected)]
        args = [
            request.run_id,
            repr(now),
            error_fragment(RunError(code=refusal.code, message=refusal.message)),
            timeline_entry("rejected", now, {"code": refusal.code.value}),
            self.retention_s,
            *request_fields(request, now, refusal.submitter),
            *extra,
        ]
        return keys, args

    def claim(self, claim: Claim, now: float) -> Call:
        names, head, target = self.names, claim.head, claim.target
        keys = [
            names.run(head.run_id),
            names.queue(target),
            names.lane(target, head.lane),
            names.lanes(target),
            names.queue_deadlines,
            names.targets,
            names.machine_assigned(claim.machine_id),
            names.outbox,
        ]
        args = [
            head.run_id,
            claim.machine_id,
            repr(now),
            head.mode,
            claim.user.casefold(),
            claim.slots,
            head.lane,
            target,
            timeline_entry("dispatched", now, {"machine_id": claim.machine_id}),
            assignment_head(claim),
            claim.fence,
        ]
        return keys, args

    def start(self, start: Start, now: float) -> Call:
        names = self.names
        keys = [names.run(start.run_id), names.outbox, names.running_deadlines]
        args = [
            start.run_id,
            start.machine_id,
            start.fence,
            repr(now),
            timeline_entry("started", now, {"machine_id": start.machine_id}),
            repr(start.run_deadline - now),  # start.lua adds it to Redis's clock
            start.worker_id,
        ]
        return keys, args

    def adopt(self, adoption: Adoption, now: float) -> Call:
        run, names = adoption.run, self.names
        target, lane, keys = self._queue_keys(run)
        held = names.machine_assigned(run.machine_id or adoption.machine_id)
        keys += [
            names.machine_assigned(adoption.machine_id),
            held,
            names.outbox,
            names.running_deadlines,
            names.fence,
        ]
        detail = {"machine_id": adoption.machine_id, "reconciled": True}
        args = [
            run.run_id,
            adoption.machine_id,
            adoption.fence,
            repr(now),
            timeline_entry("started", now, detail),
            repr(adoption.run_deadline - now),  # adopt.lua adds it to Redis's clock
            adoption.worker_id,
            lane,
            target,
            encode_assigned(run.mode.value, adoption.fence, adoption.user.casefold()),
        ]
        return keys, args

    def finish(self, ending: Ending, now: float) -> Call:
        names = self.names
        keys = [
            names.run(ending.run_id),
            names.outbox,
            names.machine_assigned(ending.machine_id),
            names.running_deadlines,
            names.finished(ending.status),
        ]
        args = [
            ending.run_id,
            "" if ending.fence is None else ending.fence,
            " ".join(fragment(s.value) for s in ending.allowed),
            ending.status.value,
            "" if ending.error is None else error_fragment(ending.error),
            "" if ending.outputs is None else fragment(ending.outputs),
            repr(now),
            timeline_entry(ending.status.value, now, ending.detail),
            self.retention_s,
            fragment(ending.machine_id) if ending.machine_id else "",
        ]
        return keys, args

    def unqueue(self, run: Run, ending: QueueEnding, now: float) -> Call:
        target, lane, keys = self._queue_keys(run)
        args = [
            run.run_id,
            ending.status.value,
            error_fragment(ending.error),
            repr(now),
            timeline_entry(ending.status.value, now, ending.detail),
            self.retention_s,
            lane,
            target,
            "1" if ending.due_only else "0",
        ]
        return [*keys, self.names.outbox, self.names.finished(ending.status)], args

    def requeue(self, run: Run, reason: str, now: float) -> Call:
        target, _, keys = self._queue_keys(run)
        entry = timeline_entry("requeued", now, {"reason": reason, "machine_id": run.machine_id})
        args = [run.run_id, run.fence if run.fence is not None else "", entry, target]
        assigned = self.names.machine_assigned(run.machine_id or "")
        return [*keys, assigned, self.names.outbox], args

    def reorder(self, run: Run, score: float, priority: Priority, event: str, now: float) -> Call:
        names, target = self.names, run.target or ""
        old_lane = lane_of(run.connection_id, run.mode.value, run.priority.value)
        new_lane = lane_of(run.connection_id, run.mode.value, priority.value)
        keys = [
            names.run(run.run_id),
            names.queue(target),
            names.lane(target, old_lane),
            names.lane(target, new_lane),
            names.lanes(target),
        ]
        args = [
            run.run_id,
            repr(score),
            old_lane,
            new_lane,
            fragment(priority.value),
            timeline_entry(event, now, {"priority": priority.value}),
        ]
        return keys, args

    def request_cancel(self, run: Run, reason: str, now: float) -> Call:
        keys = [self.names.run(run.run_id), self.names.outbox]
        args = [
            fragment(run.run_id),
            fragment(reason),
            timeline_entry("cancel_requested", now, {"reason": reason}),
        ]
        return keys, args

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
