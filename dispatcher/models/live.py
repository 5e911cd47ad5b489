"""Live state: what workers report (sessions, runs, heartbeats) and what selection sees of a
machine at one instant."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from dispatcher.models.base import SafeId, Strict, Text
from dispatcher.models.fleet import Machine
from dispatcher.models.requests import Mode


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


class LiveRecord(BaseModel):
    """What the store keeps of a machine's last heartbeat: what placement and change detection
    read, nothing else. When it was received is the heartbeat index's score, and ``running`` /
    ``finished`` serve reconciliation when the heartbeat arrives, so most heartbeats leave the
    record as it was and the store writes only the timestamp. ``extra="ignore"``: a whole
    heartbeat, as stored before this record existed, reads as one."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    worker_id: str
    sessions: tuple[Session, ...] = ()
    public_key: str | None = None
    capacity: int = 1

    @classmethod
    def of(cls, heartbeat: Heartbeat) -> LiveRecord:
        return cls(
            worker_id=heartbeat.worker_id,
            sessions=heartbeat.sessions,
            public_key=heartbeat.public_key,
            capacity=heartbeat.capacity,
        )


class AssignedRun(BaseModel):
    """A run the dispatcher has handed to a machine (dispatched or running); ``user`` is
    case-folded."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    mode: Mode
    user: str
    fence: int


@dataclass(frozen=True, slots=True)
class FleetOccupancy:
    """What the machine gauges count of a whole fleet: which machines are online, and the
    unattended runs of each online machine (not in maintenance) that has any.

    Two lookups per machine rather than an object per machine: built every few seconds for
    10,000 machines, those objects were a tenth of a replica's CPU (bench/README.md, "Live
    fleet at 10,000 machines")."""

    online: frozenset[str]
    in_use: Mapping[str, int]

    def is_online(self, machine_id: str) -> bool:
        return machine_id in self.online

    def unattended_in_use(self, machine_id: str) -> int:
        return self.in_use.get(machine_id, 0)


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
    # A worker presented another key than the pinned one: no run goes here until the machine
    # is registered again.
    key_mismatch: bool = False

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
