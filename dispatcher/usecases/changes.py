"""What the run store's transitions take (``ports.RunTransitions``): plain, frozen values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dispatcher.codes import ErrorCode
from dispatcher.models import ConnectionKind, QueuedHead, Run, RunError, RunRequest, RunStatus
from dispatcher.names import NO_SUBMITTER


@dataclass(frozen=True, slots=True)
class Admission:
    """Queue ``request`` in ``target`` unless a shared limit refuses it (throttle, cap)."""

    request: RunRequest
    target: str
    connection_kind: ConnectionKind
    score: float
    deadline: float
    throttle_limit: int
    queue_cap: int
    now: float
    submitter: str = NO_SUBMITTER  # who sent it: the last word of its events' routing keys


@dataclass(frozen=True, slots=True)
class Refusal:
    """Record ``request`` as rejected at admission with ``code`` (target and kind when known)."""

    request: RunRequest
    code: ErrorCode
    message: str
    now: float
    target: str | None = None
    connection_kind: ConnectionKind | None = None
    submitter: str = NO_SUBMITTER


@dataclass(frozen=True, slots=True)
class HandoffFacts:
    """What a run's sealed secret is bound to besides its machine: the fencing token reserved
    for its claim, its flow and its inputs (``crypto.handoff_binding``)."""

    fence: int
    flow_id: str
    inputs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Claim:
    """Hand ``head`` to ``machine_id`` under the reserved ``fence``: what the assignment
    carries, and the room the decision saw (``slots``), which the store checks again
    atomically."""

    head: QueuedHead
    target: str
    machine_id: str
    user: str
    connection_kind: ConnectionKind
    max_run_s: float
    sealed_secret: str
    slots: int
    fence: int


@dataclass(frozen=True, slots=True)
class Start:
    """A worker's fenced start of a run it was handed."""

    run_id: str
    fence: int
    run_deadline: float
    machine_id: str
    worker_id: str


@dataclass(frozen=True, slots=True)
class Adoption:
    """A run a worker reports running under ``fence`` while the store lost its claim and
    start (it holds the run queued, or dispatched under another hand-off): the worker's report
    wins, the run becomes running on ``machine_id`` (``user``: its session user, for the slot)."""

    run: Run
    fence: int
    run_deadline: float
    machine_id: str
    worker_id: str
    user: str


@dataclass(frozen=True, slots=True)
class Ending:
    """How a dispatched or running run ends: only from ``allowed`` statuses, and only under
    ``fence`` when given."""

    run_id: str
    machine_id: str
    fence: int | None
    allowed: tuple[RunStatus, ...]
    status: RunStatus
    error: RunError | None = None
    outputs: dict[str, Any] | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class QueueEnding:
    """How a queued run ends (deadline passed, cancelled, failed before its hand-off);
    ``due_only``: only if its queue deadline has passed (checked atomically)."""

    status: RunStatus
    error: RunError
    due_only: bool = False
    detail: dict[str, Any] | None = None
