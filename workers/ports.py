"""The worker's one port to the dispatcher side: everything a machine worker asks of it.

    lease      become the machine's only worker (first: a second worker is refused)
    receive    its machine's assignments (and cancels), in batches, answered with verdicts
    start      fenced starts of a batch of assignments: only the current hand-off may start
    report     the outcomes of a batch of runs (fence-checked)
    heartbeat  liveness: the machine's sessions, its running runs, its last outcomes, its key
    run_states what the dispatcher holds about runs this worker is running (drop abandoned)
    running_here  runs the dispatcher holds as running here (start-up: they were cut short)

It is implemented over RabbitMQ only (:class:`workers.adapters.amqp_link.AmqpLink`: the
worker holds no Redis URL), and over the run store for in-process tests
(:class:`workers.adapters.store_link.StoreLink`); the worker's jobs only know this Protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dispatcher.models import Heartbeat, RunError, RunStatus
from dispatcher.usecases.ports import BatchHandler
from dispatcher.usecases.results import FinishResult, RunState, StartResult


@dataclass(frozen=True, slots=True)
class StartRequest:
    """Start ``run_id`` under ``fence``; the dispatcher fails it if it runs past ``deadline``."""

    run_id: str
    fence: int
    deadline: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended on this machine."""

    run_id: str
    fence: int
    status: RunStatus
    error: RunError | None = None
    outputs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RunningHere:
    """A run the dispatcher holds as running on this machine, under ``fence``."""

    run_id: str
    fence: int


class DispatcherLink(Protocol):
    """The dispatcher side, as one machine's worker sees it."""

    async def lease(self) -> None:
        """Become the machine's only live worker before asking anything else;
        ``InExclusiveUse`` when another worker serves it (held until the link closes)."""
        ...

    async def lease_lost(self) -> str:
        """Return, with why, once another worker holds the lease (after a reconnection)."""
        ...

    async def receive(
        self, handler: BatchHandler, *, batch_size: int, prefetch: int
    ) -> asyncio.Task[None]:
        """Deliver this machine's assignments and cancels to ``handler`` in batches."""
        ...

    async def stop_receiving(self, timeout_s: float) -> bool:
        """Take no more assignments; finish handling those received (a graceful stop)."""
        ...

    async def start(self, starts: Sequence[StartRequest]) -> list[StartResult]:
        """Fenced starts, in one round trip: ``Started`` only for the current hand-off."""
        ...

    async def report(self, outcomes: Sequence[Outcome]) -> list[FinishResult]:
        """Record outcomes, in one round trip; a stale fence is refused."""
        ...

    async def heartbeat(self, heartbeat: Heartbeat) -> None: ...

    async def run_states(self, run_ids: Sequence[str]) -> list[RunState]: ...

    async def running_here(self) -> list[RunningHere]: ...

    async def aclose(self) -> None:
        """Finish what is in flight (at shutdown)."""
        ...
