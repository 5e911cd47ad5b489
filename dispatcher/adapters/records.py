"""The run record as stored in Redis, and what the Lua scripts hand back.

A run is a hash whose values are JSON fragments; the scripts splice them into the record's
JSON, so none of them parses JSON. Every script returns a result word and the outbox messages
it recorded (events, assignments) for the caller to publish.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from dispatcher.codes import ErrorCode
from dispatcher.models import Run, RunStatus

SCRIPTS = ("admit", "reject", "claim", "start", "finish", "unqueue", "requeue", "reorder")


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


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def outcome_of(raw: Sequence[Any]) -> Outcome:
    result = text(raw[0])
    messages: list[OutboxMessage] = []
    extra: list[Any] = []
    for item in raw[1:]:
        if isinstance(item, list) and len(item) == 4:
            body = item[3] if isinstance(item[3], bytes) else str(item[3]).encode()
            messages.append(OutboxMessage(text(item[0]), text(item[1]), text(item[2]), body))
        else:
            extra.append(text(item) if isinstance(item, bytes) else item)
    return Outcome(result, tuple(messages), tuple(extra))


def load_scripts() -> dict[str, str]:
    """The Lua sources, each prefixed with the shared helpers."""
    package = resources.files("dispatcher.adapters") / "lua"
    common = (package / "common.lua").read_text()
    return {name: common + "\n" + (package / f"{name}.lua").read_text() for name in SCRIPTS}


NOTE_SCRIPT = (
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


def parse_run(raw: dict[bytes, bytes]) -> Run:
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
