"""Runs: statuses, the dispatcher's record of a run, and the hand-off a worker receives."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dispatcher.codes import ErrorCode
from dispatcher.models.fleet import ConnectionKind
from dispatcher.models.requests import Mode, Priority


class RunStatus(StrEnum):
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    timed_out = "timed_out"
    rejected = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {
        RunStatus.succeeded,
        RunStatus.failed,
        RunStatus.cancelled,
        RunStatus.timed_out,
        RunStatus.rejected,
    }
)


class RunError(BaseModel):
    code: ErrorCode
    message: str
    detail: dict[str, Any] | None = None


class TimelineEvent(BaseModel):
    at: float
    event: str
    detail: dict[str, Any] | None = None


class Run(BaseModel):
    """The dispatcher's record of a request (SPEC §2)."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    status: RunStatus
    flow_id: str
    connection_id: str
    requested_by: str
    mode: Mode
    priority: Priority = Priority.normal
    inputs: dict[str, Any] = Field(default_factory=dict)
    queue_timeout_s: float | None = None
    max_run_s: float | None = None
    submitted_at: float | None = None
    fail_early: bool = False
    target: str | None = None
    connection_kind: ConnectionKind | None = None
    machine_id: str | None = None
    fence: int | None = None
    queued_at: float | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    queue_deadline: float | None = None
    error: RunError | None = None
    outputs: dict[str, Any] | None = None
    reasons: dict[str, str] | None = None
    cancel_requested: bool = False
    timeline: list[TimelineEvent] = Field(default_factory=list)


class Assignment(BaseModel):
    """The hand-off message a machine worker receives. The secret inside is sealed to it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    fence: int
    machine_id: str
    mode: Mode
    user: str
    connection_kind: ConnectionKind
    max_run_s: float
    sealed_secret: str | None = None
    request: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.request["run_id"])

    @property
    def flow_id(self) -> str:
        return str(self.request["flow_id"])

    @property
    def inputs(self) -> dict[str, Any]:
        inputs = self.request.get("inputs") or {}
        return inputs if isinstance(inputs, dict) else {}

    @property
    def time_limit_s(self) -> float:
        """The run time limit: the request's ``max_run_s``, else the dispatcher's default."""
        requested = self.request.get("max_run_s")
        return float(requested) if isinstance(requested, int | float) else self.max_run_s


@dataclass(frozen=True, slots=True)
class QueuedHead:
    """A queued run as placement sees it: its id, order score and lane (see ``lane_of``)."""

    run_id: str
    score: float
    lane: str

    @property
    def connection_id(self) -> str:
        return self.lane.split("|", 2)[0]

    @property
    def mode(self) -> str:
        return self.lane.split("|", 2)[1]
