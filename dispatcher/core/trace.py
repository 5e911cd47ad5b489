"""What the capacity replay keeps of the past: one record per run, one per machine change.

A ``TraceRecord`` is written once per run, when it leaves the system (finished, timed out,
cancelled, failed while queued): target, connection (and its kind), mode, priority, order score
(priority boosts and moves to the top included), flow, when it was queued, its queue deadline,
its final status, and, when it was handed to a machine, on which one, when, when its worker
started it and when it finished. The same records feed the service model
(``ServiceModel.learn``). The stored form (``to_dict``: short keys, times to the millisecond)
is under 300 bytes of JSON.

From these the replay rebuilds the arrivals (``queued_at``), the queue order (``score``), the
slot times (``finished_at - dispatched_at``) and, with the fleet's connections and machines,
eligibility. Machines whose state changes (online or offline, maintenance, the sessions their
worker reports) write a ``MachineChange``, so that attended runs waiting for a session and
machines offline for an hour are replayed as they were.

Bounds (kept by the store): records older than the retention window are dropped, and a target
keeps at most a fixed number of records (the oldest go first); a window the store no longer
covers in full is replayed from the records it still has, and says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.models import ConnectionKind, Mode, Priority, RunStatus, SessionState


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """What the replay keeps of one run (times are epoch seconds)."""

    run_id: str
    target: str
    connection_id: str
    kind: ConnectionKind
    mode: Mode
    priority: Priority
    flow_id: str
    queued_at: float
    queue_deadline: float
    status: RunStatus
    score: float | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    machine_id: str | None = None

    @property
    def slot_time(self) -> float | None:
        if self.dispatched_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.dispatched_at)

    @property
    def waited(self) -> float | None:
        """Time in the queue, to the hand-off (None when it left the queue otherwise)."""
        return None if self.dispatched_at is None else max(0.0, self.dispatched_at - self.queued_at)

    def to_dict(self) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "r": self.run_id, "t": self.target, "c": self.connection_id, "k": self.kind.value,
            "m": self.mode.value, "p": self.priority.value, "f": self.flow_id,
            "q": round(self.queued_at, 3), "dl": round(self.queue_deadline, 3),
            "st": self.status.value,
        }  # fmt: skip
        for key, value in (
            ("o", self.score),
            ("d", self.dispatched_at),
            ("s", self.started_at),
            ("e", self.finished_at),
        ):
            if value is not None:
                raw[key] = round(value, 3)
        if self.machine_id is not None:
            raw["mc"] = self.machine_id
        return raw

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TraceRecord:
        """Read a stored record; ``ValueError`` (or ``KeyError``) says what is wrong."""
        try:
            return cls(
                run_id=str(raw["r"]), target=str(raw["t"]), connection_id=str(raw["c"]),
                kind=ConnectionKind(raw["k"]), mode=Mode(raw["m"]), priority=Priority(raw["p"]),
                flow_id=str(raw["f"]), queued_at=_time(raw["q"]),
                queue_deadline=_time(raw["dl"]), status=RunStatus(raw["st"]),
                score=_maybe(raw.get("o")), dispatched_at=_maybe(raw.get("d")),
                started_at=_maybe(raw.get("s")), finished_at=_maybe(raw.get("e")),
                machine_id=str(raw["mc"]) if raw.get("mc") is not None else None,
            )  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a trace record: {exc!r}") from exc


def _time(value: Any) -> float:
    """A time as stored: a number, or its text (a Redis stream field)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | bytes):
        raise ValueError(f"expected a time, got {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"expected a finite time, got {value!r}")
    return result


def _maybe(value: Any) -> float | None:
    return None if value is None else _time(value)


@dataclass(frozen=True, slots=True)
class MachineChange:
    """A machine's state from ``at`` on, as its heartbeats (or an operator) changed it."""

    at: float
    machine_id: str
    online: bool
    maintenance: bool = False
    sessions: tuple[tuple[str, SessionState], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": round(self.at, 3), "mc": self.machine_id, "on": self.online,
            "mt": self.maintenance, "s": [[user, state.value] for user, state in self.sessions],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MachineChange:
        try:
            return cls(
                at=_time(raw["a"]), machine_id=str(raw["mc"]), online=_flag(raw["on"]),
                maintenance=_flag(raw.get("mt", False)),
                sessions=tuple((str(u), SessionState(s)) for u, s in raw.get("s", ())),
            )  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a machine change: {exc!r}") from exc


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value
