"""What a run-store transition answers: one small frozen result per outcome, to ``match`` on.

A result that changed the run (a :class:`Recorded`) carries the outbox messages the change
implies (events, an assignment, a cancel). They were written to the outbox by the same atomic
step; the lifecycle use case publishes them, nobody else does.

::

    admit          Queued | Rejected(code) | Duplicate(status)
    reject         Rejected(code) | Duplicate(status)
    claim          Claimed(fence) | NotQueued | UserBusy | NoSlot | Failed(error)
    start          Started | Refused(status, fence) | Failed(error)
    finish         Finished | Missing | Stale(status, fence) | Conflict(status) | Failed(error)
    unqueue        Unqueued | NotDue | Conflict(status)
    requeue        Requeued | Conflict(status)
    reorder        Reordered | Conflict(status)
    request_cancel CancelRequested | Conflict(status)
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.codes import ErrorCode
from dispatcher.models import LiveRecord, RunStatus


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message recorded with a state change, to publish and then delete from the outbox."""

    id: str
    kind: str  # "event" | "assign" | "cancel"
    routing_key: str
    body: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class Recorded:
    """A transition that changed the run; ``messages`` are what the change implies."""

    messages: tuple[OutboxMessage, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Queued(Recorded):
    """The run is admitted and waits in its target's queue."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected(Recorded):
    """The run was recorded as rejected at admission, with ``code``."""

    code: ErrorCode


@dataclass(frozen=True, slots=True, kw_only=True)
class Duplicate:
    """A run with this id exists already (``status``): nothing was recorded."""

    status: RunStatus | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Claimed(Recorded):
    """The run is dispatched to the machine under the new fencing token ``fence``."""

    fence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NotQueued:
    """The run left its queue meanwhile (another replica took it, it timed out ...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class UserBusy:
    """A run of the same user occupies the machine already (another replica was faster)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NoSlot:
    """Every unattended slot of the machine is taken (another replica was faster)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    """The store could not run this one call of a batch (the others may have succeeded)."""

    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Started(Recorded):
    """The run is running on the machine under its current fencing token."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused:
    """No start: the run is not dispatched to this machine under this token (any more)."""

    status: RunStatus | None
    fence: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Finished(Recorded):
    """The run ended with the requested status."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Missing:
    """No run has this id (it expired, or never existed)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Stale:
    """The run is under another fencing token now (``fence``): the request came too late."""

    status: RunStatus | None
    fence: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    """The run is in ``status``, from which this transition is not allowed."""

    status: RunStatus | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unqueued(Recorded):
    """The queued run ended (timed out, cancelled, failed before its hand-off)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NotDue:
    """The run's queue deadline has not passed (it was extended meanwhile)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Requeued(Recorded):
    """The dispatched run is back in its queue, at its old position."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Reordered(Recorded):
    """The queued run has a new score (and perhaps a new priority)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequested(Recorded):
    """The running run is marked ``cancel_requested``; its worker is told to stop it."""


AdmitResult = Queued | Rejected | Duplicate
RejectResult = Rejected | Duplicate
ClaimResult = Claimed | NotQueued | UserBusy | NoSlot | Failed
StartResult = Started | Refused | Failed
FinishResult = Finished | Missing | Stale | Conflict | Failed
UnqueueResult = Unqueued | NotDue | Conflict
RequeueResult = Requeued | Conflict
ReorderResult = Reordered | Conflict
CancelResult = CancelRequested | Conflict


@dataclass(frozen=True, slots=True)
class RunState:
    """The few fields a fenced decision needs about a run (None: no such run)."""

    status: RunStatus | None
    fence: int | None
    machine_id: str | None


# ---- heartbeats ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KeyRefused:
    """The heartbeat's public key is not the one pinned since the machine's registration: the
    machine is marked ``KeyMismatch`` and nothing else is recorded."""


@dataclass(frozen=True, slots=True)
class BeatRecorded:
    """A heartbeat recorded. ``changed``: its live record (worker, sessions, key, capacity)
    differs from the stored one, or there was none; ``previous`` is the record it replaced
    (None when unchanged or first)."""

    was_offline: bool
    changed: bool
    previous: LiveRecord | None = None


HeartbeatOutcome = KeyRefused | BeatRecorded
