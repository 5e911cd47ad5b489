"""The domain, as pydantic models (SPEC §2). No I/O here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from dispatcher.codes import ErrorCode

# Ids end up in AMQP names and Redis keys: keep them to a safe alphabet.
SafeId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@\-]+$")]
Text = Annotated[str, Field(min_length=1, max_length=256)]
TenantId = Annotated[
    str,
    Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
]
Seconds = StrictFloat | StrictInt

MAX_INPUT_DEPTH = 32


class Mode(StrEnum):
    attended = "attended"
    unattended = "unattended"


class Priority(StrEnum):
    high = "high"
    normal = "normal"


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


class Strict(BaseModel):
    """Base of every model read from outside: unknown fields and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping early past ``limit``.

    Also refuses NaN and Infinity, which are not JSON and which the parser lets through.
    """
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("inputs hold NaN or Infinity, which JSON cannot carry")
    return deepest


class RunRequest(Strict):
    """What a cloud flow sends (SPEC §2). ``run_id`` is the idempotency key."""

    run_id: SafeId
    flow_id: Text
    connection_id: SafeId
    requested_by: Text
    mode: Mode
    priority: Priority = Priority.normal
    inputs: dict[str, Any] = Field(default_factory=dict)
    # JSON has no NaN/Infinity; an infinite max_run_s would switch the run time limit off.
    queue_timeout_s: Seconds | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_run_s: Seconds | None = Field(default=None, gt=0, allow_inf_nan=False)
    submitted_at: datetime | None = Field(default=None, strict=False)

    @field_validator("inputs")
    @classmethod
    def _inputs_not_too_deep(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _depth(value, MAX_INPUT_DEPTH) > MAX_INPUT_DEPTH:
            raise ValueError(f"inputs nest deeper than {MAX_INPUT_DEPTH} levels")
        return value


class Target(Strict):
    """A connection's target: exactly one of ``machine_id`` or ``group_id``."""

    machine_id: SafeId | None = None
    group_id: SafeId | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.machine_id is None) == (self.group_id is None):
            raise ValueError("a target names exactly one of machine_id or group_id")
        return self

    @property
    def key(self) -> str:
        """Queue key of the target: ``m:<id>`` or ``g:<id>``."""
        if self.machine_id is not None:
            return f"m:{self.machine_id}"
        return f"g:{self.group_id}"


class Environment(Strict):
    tenant_id: TenantId


class Group(Strict):
    group_id: SafeId
    name: Text


class OsKind(StrEnum):
    windows_client = "windows_client"
    windows_server = "windows_server"


class JoinType(StrEnum):
    entra_joined = "entra_joined"
    hybrid_joined = "hybrid_joined"
    ad_joined = "ad_joined"
    workgroup = "workgroup"


class Machine(Strict):
    """A registered machine's configuration (its live state comes from its worker)."""

    machine_id: SafeId
    name: Text
    group_id: SafeId | None = None
    os: OsKind = OsKind.windows_server
    join_type: JoinType = JoinType.entra_joined
    allowed_registration_tenants: tuple[TenantId, ...] = ()
    max_unattended_runs: int = Field(default=1, ge=1, le=10)
    maintenance: bool = False


class ConnectionKind(StrEnum):
    credentials = "credentials"
    sign_in = "sign_in"


class SecretRef(Strict):
    """Where a credentials connection's password lives when it is not stored here."""

    provider: Literal["azure_key_vault", "cyberark"]
    vault_url: Annotated[str, Field(min_length=1, max_length=1024)]
    secret_name: Text | None = None  # azure_key_vault
    app_id: Text | None = None  # cyberark
    safe: Text | None = None  # cyberark
    object: Text | None = None  # cyberark


class Connection(Strict):
    """A desktop-flow connection. ``password_sealed`` is the stored password, encrypted."""

    connection_id: SafeId
    owner: Text
    kind: ConnectionKind
    target: Target
    username: Text | None = None
    password_sealed: str | None = None
    secret_ref: SecretRef | None = None
    account: Text | None = None
    tenant_id: TenantId | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Connection:
        if self.kind is ConnectionKind.credentials and not self.username:
            raise ValueError("a credentials connection needs a username")
        if self.kind is ConnectionKind.sign_in and (not self.account or not self.tenant_id):
            raise ValueError("a sign_in connection needs an account and a tenant_id")
        return self

    @property
    def session_user(self) -> str:
        """The Windows or Entra user whose session the runs of this connection use."""
        return (self.account if self.kind is ConnectionKind.sign_in else self.username) or ""


class SessionState(StrEnum):
    active = "active"
    locked = "locked"
    disconnected = "disconnected"


class Session(Strict):
    user: Text
    state: SessionState


class RunningRef(Strict):
    """A run a worker reports as executing, with the fencing token it was started under."""

    run_id: SafeId
    fence: int


class FinishedRef(Strict):
    """A run this worker finished lately, as it recorded the outcome (for reconciliation)."""

    run_id: SafeId
    fence: int
    status: Literal["succeeded", "failed", "cancelled"]
    code: str | None = None


class Heartbeat(Strict):
    """What a worker reports about its machine at every heartbeat. ``running`` and
    ``finished`` let the dispatcher repair a store that lost its last writes."""

    machine_id: SafeId
    worker_id: Text
    sent_at: float
    sessions: tuple[Session, ...] = ()
    running: tuple[RunningRef, ...] = ()
    finished: tuple[FinishedRef, ...] = ()
    public_key: str | None = None
    capacity: int = 1


class AssignedRun(BaseModel):
    """A run the dispatcher has handed to a machine (dispatched or running)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    mode: Mode
    user: str
    fence: int

    def encode(self) -> str:
        return f"{self.mode.value}|{self.fence}|{self.user}"

    @classmethod
    def decode(cls, run_id: str, value: str) -> AssignedRun:
        mode, fence, user = value.split("|", 2)
        return cls(run_id=run_id, mode=Mode(mode), user=user, fence=int(fence))


class MachineView(BaseModel):
    """Everything selection needs to know about one machine, at one instant."""

    model_config = ConfigDict(frozen=True)

    machine: Machine
    online: bool
    offline_since: float | None = None
    sessions: tuple[Session, ...] = ()
    assigned: tuple[AssignedRun, ...] = ()
    has_public_key: bool = True
    public_key: str | None = None

    @property
    def machine_id(self) -> str:
        return self.machine.machine_id

    @property
    def load(self) -> int:
        return len(self.assigned)

    # Indexes selection asks for once per machine and lane head: computed once per view.
    # ``model_copy`` drops them (a copy with other runs or sessions must not inherit them).
    @cached_property
    def unattended_in_use(self) -> int:
        return sum(1 for run in self.assigned if run.mode is Mode.unattended)

    @cached_property
    def occupying_users(self) -> frozenset[str]:
        """Casefolded users of the runs dispatched to or running on the machine."""
        return frozenset(run.user.casefold() for run in self.assigned)

    @cached_property
    def unattended_users(self) -> frozenset[str]:
        """Casefolded users of the unattended runs on the machine (each holds a session)."""
        return frozenset(
            run.user.casefold() for run in self.assigned if run.mode is Mode.unattended
        )

    @cached_property
    def session_states(self) -> dict[str, tuple[SessionState, ...]]:
        """Casefolded user -> the states of their reported sessions, in reported order."""
        states: dict[str, tuple[SessionState, ...]] = {}
        for session in self.sessions:
            key = session.user.casefold()
            states[key] = (*states.get(key, ()), session.state)
        return states

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        for name in _VIEW_INDEXES:
            copied.__dict__.pop(name, None)
        return copied


_VIEW_INDEXES = tuple(
    name for name, value in vars(MachineView).items() if isinstance(value, cached_property)
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


class CancelRequest(Strict):
    """Cancel a run, over AMQP (routing key ``cancel``) or from the CLI."""

    run_id: SafeId
    reason: Annotated[str, Field(max_length=512)] | None = None


class FleetFile(BaseModel):
    """A fleet file (SPEC §4): environment, groups, machines, connections."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    environment: Environment
    groups: tuple[Group, ...] = ()
    machines: tuple[Machine, ...] = ()
    connections: tuple[dict[str, Any], ...] = ()
