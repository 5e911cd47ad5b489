"""The small boundaries the use cases depend on, as Protocols, and what crosses them.

The adapters (``dispatcher/adapters``) implement them over RabbitMQ and Redis; the in-memory
fakes of the tests implement them too. A use case never imports an adapter.

- deliveries: :class:`Delivery` in, a :data:`Verdict` out (the consumer adapter acts on it);
- :class:`Broker`: consume a queue, publish a message of the contract;
- the run store: :class:`RunTransitions` (atomic, fenced changes answering typed results,
  see :mod:`~dispatcher.usecases.results`) and :class:`RunReads`;
- :class:`MachineState`, :class:`FleetSource`, :class:`Leases`: live machines, the fleet, and
  who performs a singleton chore;
- :class:`Publisher`: publishes what the outbox recorded;
- :class:`TokenSource`, :class:`PasswordSource`, :data:`Sealer`: a run's secret.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.errors import Unavailable
from dispatcher.models import (
    AssignedRun,
    Connection,
    Heartbeat,
    Machine,
    MachineView,
    Priority,
    QueuedHead,
    Run,
    RunStatus,
)
from dispatcher.usecases.changes import (
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
    HeartbeatOutcome,
    OutboxMessage,
    RejectResult,
    ReorderResult,
    RequeueResult,
    RunState,
    StartResult,
    UnqueueResult,
)

# Re-exported: the values the transitions take live in ``changes``.
__all__ = [
    "Admission",
    "Adoption",
    "Claim",
    "Ending",
    "HandoffFacts",
    "QueueEnding",
    "Refusal",
    "Start",
]


# ---- deliveries and verdicts ------------------------------------------------------------------
class Delivery(Protocol):
    """What the data path reads of an AMQP delivery (the consumer adapter owns acking)."""

    @property
    def body(self) -> bytes: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def content_encoding(self) -> str | None: ...

    @property
    def routing_key(self) -> str | None: ...

    @property
    def type(self) -> str | None: ...

    @property
    def user_id(self) -> str | None:
        """The publisher's broker user, validated by RabbitMQ (None when it set none)."""
        ...

    @property
    def headers(self) -> Mapping[str, Any] | None:
        """The message's headers (``core/principals.publisher_of`` reads one of them)."""
        ...


@dataclass(frozen=True, slots=True)
class Ack:
    """The message's effect is durably recorded."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The message breaks the contract: copy it to the dead-letter queue with ``reason``."""

    reason: str
    reason_class: str


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: give the message back to RabbitMQ for another try.

    ``outage``: a service the handler needs could not be reached. The consumer then keeps the
    delivery and tries again itself for a while (a quorum queue counts every redelivery).
    """

    error: str
    outage: bool = False


Verdict = Ack | DeadLetter | Retry
BatchHandler = Callable[[Sequence[Delivery]], Awaitable[list[Verdict]]]


def retry_for(exc: BaseException) -> Retry:
    """The verdict for a message whose handling raised ``exc`` (decided by the error tree)."""
    return Retry(repr(exc), outage=isinstance(exc, Unavailable))


class Broker(Protocol):
    """RabbitMQ as the use cases see it."""

    async def consume(
        self,
        queue: str,
        handler: BatchHandler,
        *,
        batch_size: int,
        prefetch: int | None = None,
        gather_s: float = 0.0,
    ) -> asyncio.Task[None]:
        """Consume ``queue`` in batches; the consumer acts on the handler's verdicts.
        ``gather_s``: after a batch's first delivery, wait that long for more (for messages
        whose handling costs mostly per batch and that may wait, such as heartbeats)."""
        ...

    async def hold_exclusive_queue(self, queue: str) -> None:
        """Declare ``queue`` exclusive to this connection: a lock that RabbitMQ refuses to any
        other connection (``InExclusiveUse``) and frees when this one closes; taken again
        after a reconnection."""
        ...

    async def stop_consuming(self, timeout_s: float, queues: Sequence[str] | None = None) -> bool:
        """Cancel every consumer (of ``queues`` only, when given) and finish the deliveries
        received (a graceful stop); False when that took longer than ``timeout_s``."""
        ...

    async def publish_json(
        self, role: str, routing_key: str, body: bytes, *, kind: str, mandatory: bool = True
    ) -> None:
        """Publish one persistent JSON message to an exchange of the contract (confirmed)."""
        ...

    async def publish_many_json(
        self,
        role: str,
        messages: Sequence[tuple[str, bytes]],
        *,
        kind: str,
        mandatory: bool = True,
    ) -> None:
        """Publish persistent JSON messages ``(routing key, body)`` as one window, the
        confirms awaited together."""
        ...

    async def publish_reply(self, machine_id: str, body: bytes) -> None:
        """Answer a machine's worker on its replies queue (confirmed); a replies queue that is
        gone is declared again first."""
        ...

    async def ensure_machine_queue(self, machine_id: str) -> None:
        """Declare a machine's queue (idempotent)."""
        ...


class Publisher(Protocol):
    """Publishes outbox messages (confirmed) and forgets them; the relay republishes what a
    dead process left behind."""

    async def send(self, messages: Sequence[OutboxMessage]) -> bool: ...

    async def relay(self, older_than_s: float) -> int: ...

    async def aclose(self) -> None: ...


# ---- the run store ---------------------------------------------------------------------------
class RunTransitions(Protocol):
    """Atomic changes of runs; each answers a typed result (see ``results``) and writes the
    messages it implies to the outbox in the same step."""

    async def admit(self, admission: Admission) -> AdmitResult: ...

    async def reject(self, refusal: Refusal) -> RejectResult: ...

    async def reserve_handoffs(self, run_ids: Sequence[str]) -> list[HandoffFacts | None]:
        """A new fencing token for each run about to be claimed, with its flow and inputs
        (None for a run the store does not hold), in one round trip."""
        ...

    async def claim_many(self, claims: Sequence[Claim], now: float) -> list[ClaimResult]: ...

    async def start_many(self, starts: Sequence[Start], now: float) -> list[StartResult]: ...

    async def adopt_many(self, adoptions: Sequence[Adoption], now: float) -> list[StartResult]: ...

    async def finish_many(self, endings: Sequence[Ending], now: float) -> list[FinishResult]: ...

    async def unqueue(self, run: Run, ending: QueueEnding, now: float) -> UnqueueResult: ...

    async def requeue(self, run: Run, *, reason: str, now: float) -> RequeueResult: ...

    async def reorder(
        self, run: Run, *, score: float, priority: Priority, event: str, now: float
    ) -> ReorderResult: ...

    async def request_cancel(self, run: Run, *, reason: str, now: float) -> CancelResult: ...

    async def record_reasons(
        self, target: str, waiting: dict[str, tuple[str, dict[str, str]]], now: float
    ) -> int:
        """Store why lane heads wait (lane -> (head run, reasons per machine)); a change also
        goes into the head run's timeline. Returns how many lanes changed."""
        ...

    async def forget_deadline(self, run_id: str) -> None:
        """Drop a run that is no longer queued from the deadline index."""
        ...

    async def forget_running(self, run_id: str) -> None:
        """Drop a run that is no longer running from the run-time-limit index."""
        ...


class RunReads(Protocol):
    """Reads of runs and queues (no locks: a decision made on them is checked again by the
    transition that acts on it)."""

    async def get(self, run_id: str) -> Run | None: ...

    async def get_many(self, run_ids: Sequence[str]) -> list[Run | None]: ...

    async def briefs(self, run_ids: Sequence[str]) -> list[Run | None]: ...

    async def states(self, run_ids: Sequence[str]) -> list[RunState]: ...

    async def score_of(self, run_id: str) -> float | None: ...

    async def position(self, run: Run) -> int | None: ...

    async def queue_page(self, target: str, start: int, stop: int) -> list[tuple[str, float]]: ...

    async def targets(self) -> list[str]: ...

    async def lane_names(self, target: str) -> list[str]: ...

    async def lane_members(
        self, target: str, lanes: list[str], per_lane: int, heads_only: Collection[str] = ()
    ) -> dict[str, list[QueuedHead]]:
        """The first ``per_lane`` runs of each lane (only the first of ``heads_only``)."""
        ...

    async def due_deadlines(self, now: float, limit: int = 500) -> list[str]: ...

    async def overdue_running(self, now: float, limit: int = 500) -> list[str]: ...

    async def finished_since(self, status: RunStatus, since: float, until: float) -> list[str]: ...

    async def lane_reasons(self, target: str, lane: str) -> dict[str, Any] | None: ...


# ---- machines, fleet, leases ------------------------------------------------------------------
class MachineState(Protocol):
    """Live machine state: heartbeats, what runs on each machine, offline marks."""

    async def record_heartbeats(
        self, heartbeats: Sequence[Heartbeat], received_at: float
    ) -> list[HeartbeatOutcome]:
        """Pin each heartbeat's key (at the first heartbeat since registration) and record it,
        the batch in one round trip; one outcome per heartbeat, in order."""
        ...

    async def pin_key(self, machine_id: str, public_key: str, now: float) -> bool:
        """Pin ``public_key`` for the machine if none is pinned since its registration; True
        when it is the pinned key, False (and the machine marked ``KeyMismatch``) when not."""
        ...

    async def views(
        self, machines: Sequence[Machine], now: float, offline_after_s: float
    ) -> list[MachineView]: ...

    async def stale(self, now: float, offline_after_s: float) -> list[str]: ...

    async def offline_marks(self) -> dict[str, float]: ...

    async def mark_offline(self, machine_id: str, since: float) -> bool: ...

    async def assigned(self, machine_id: str) -> list[AssignedRun]: ...

    async def assigned_to(self, machine_ids: Sequence[str]) -> dict[str, list[AssignedRun]]:
        """The runs assigned to each of ``machine_ids`` that has any (a whole-fleet read: an
        idle machine costs nothing)."""
        ...

    async def placement_hold_s(
        self, now: float, heartbeat_interval_s: float, offline_after_s: float
    ) -> float:
        """How long placement must still wait because the store restarted or failed over (0:
        it may go on). Such a store may have lost its last writes, claims included; a run whose
        claim was lost is back in its queue while a machine runs it. Placement waits until
        every machine online then has heartbeated since (its report repairs the lost claim),
        or has gone offline: at most ``offline_after_s`` + ``heartbeat_interval_s``."""
        ...


class FleetSource(Protocol):
    """The fleet configuration, as a snapshot cached until it changes."""

    async def load(self, force: bool = False) -> FleetSnapshot: ...

    def cached(self) -> FleetSnapshot | None: ...


class Leases(Protocol):
    """Short leases so that one replica at a time performs a singleton chore."""

    async def hold(self, role: str, ttl_s: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class TargetOutlook:
    """The last forecast of a target: its earliest queue deadline, runs predicted to miss."""

    at: float
    next_deadline_at: float | None
    predicted_timeouts: int


class TraceStore(Protocol):
    """What foresight keeps (``core.trace``), within the trace retention, and its outlooks."""

    async def record(self, records: Sequence[TraceRecord]) -> None: ...

    async def read(
        self, target: str, after: str = "-", limit: int | None = None
    ) -> tuple[list[TraceRecord], str]: ...

    async def record_changes(self, changes: Sequence[MachineChange]) -> None: ...

    async def changes(self) -> list[MachineChange]: ...

    async def traced_targets(self) -> list[str]: ...

    async def save_outlooks(self, outlooks: dict[str, TargetOutlook]) -> None: ...

    async def outlooks(self) -> dict[str, TargetOutlook]: ...


class PassRequests(Protocol):
    """Where use cases ask for placement passes over targets (the ``Placer``)."""

    def request(self, *targets: str) -> None: ...


# ---- a run's secret ------------------------------------------------------------------------------
class TokenSource(Protocol):
    """Access tokens of sign-in connections (the msal token broker)."""

    async def access_token(self, connection: Connection, valid_for_s: float) -> str: ...

    async def refresh_token_expiry(self, connection: Connection) -> float | None: ...


class PasswordSource(Protocol):
    """Passwords of credentials connections, resolved at dispatch time."""

    async def password(self, connection: Connection) -> str: ...


# Encrypts a secret to one machine's public key, bound to one run (public key, plaintext, aad).
Sealer = Callable[[str, bytes, str], str]
