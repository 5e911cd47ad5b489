"""The domain, as pydantic models (SPEC §2). No I/O here.

- :mod:`~dispatcher.models.requests`: what a cloud flow sends (run requests, cancels);
- :mod:`~dispatcher.models.fleet`: environment, groups, machines, connections, fleet files;
- :mod:`~dispatcher.models.live`: what workers report and what selection sees of a machine;
- :mod:`~dispatcher.models.runs`: statuses, the run record, the hand-off a worker receives.

Everything is re-exported here: ``from dispatcher.models import Run``.
"""

from dispatcher.models.base import MAX_INPUT_DEPTH, SafeId, Seconds, Strict, TenantId, Text
from dispatcher.models.fleet import (
    Connection,
    ConnectionKind,
    Environment,
    FleetFile,
    Group,
    JoinType,
    Machine,
    OsKind,
    SecretRef,
    Submitter,
    Target,
)
from dispatcher.models.live import (
    AssignedRun,
    FinishedRef,
    FleetOccupancy,
    Heartbeat,
    LiveRecord,
    MachineView,
    RunningRef,
    Session,
    SessionState,
)
from dispatcher.models.requests import CancelRequest, Mode, Priority, RunRequest
from dispatcher.models.runs import (
    TERMINAL_STATUSES,
    Assignment,
    QueuedHead,
    Run,
    RunError,
    RunStatus,
    TimelineEvent,
)

__all__ = [
    "MAX_INPUT_DEPTH",
    "TERMINAL_STATUSES",
    "AssignedRun",
    "Assignment",
    "CancelRequest",
    "Connection",
    "ConnectionKind",
    "Environment",
    "FinishedRef",
    "FleetFile",
    "FleetOccupancy",
    "Group",
    "Heartbeat",
    "JoinType",
    "LiveRecord",
    "Machine",
    "MachineView",
    "Mode",
    "OsKind",
    "Priority",
    "QueuedHead",
    "Run",
    "RunError",
    "RunRequest",
    "RunStatus",
    "RunningRef",
    "SafeId",
    "Seconds",
    "SecretRef",
    "Session",
    "SessionState",
    "Strict",
    "Submitter",
    "Target",
    "TenantId",
    "Text",
    "TimelineEvent",
]
