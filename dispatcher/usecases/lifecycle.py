"""The run lifecycle: record a transition, then publish what it implies, through the outbox.

Every change of a run goes through here (intake, placement, the sweeper, reconcile, cancel,
the worker's link): the run store's transition writes the change and its messages (events, an
assignment, a cancel) to the outbox atomically, and the window publishes the messages of all
its transitions as one confirmed publish window when it closes. Callers never publish.

    async with lifecycle.window() as window:
        results = await window.claim_many(claims, now)   # recorded, messages kept
    # closed: every message of the window published (or left to the outbox relay)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

from dispatcher.core.placement import Waiting
from dispatcher.models import Priority, Run
from dispatcher.usecases.ports import (
    Admission,
    Adoption,
    Claim,
    Ending,
    HandoffFacts,
    Publisher,
    QueueEnding,
    Refusal,
    RunTransitions,
    Start,
)
from dispatcher.usecases.results import (
    AdmitResult,
    CancelResult,
    ClaimResult,
    FinishResult,
    OutboxMessage,
    Recorded,
    RejectResult,
    ReorderResult,
    RequeueResult,
    StartResult,
    UnqueueResult,
)

R = TypeVar("R")


class Window:
    """Transitions whose messages are published together when the window closes."""

    def __init__(self, store: RunTransitions) -> None:
        self._store = store
        self.messages: list[OutboxMessage] = []
        # A window closed with ``wait=False``: its publication, under way (None: none).
        self.sending: asyncio.Task[bool] | None = None

    def _keep(self, result: R) -> R:
        if isinstance(result, Recorded):
            self.messages.extend(result.messages)
        return result

    def _keep_all(self, results: list[R]) -> list[R]:
        for result in results:
            self._keep(result)
        return results

    async def admit(self, admission: Admission) -> AdmitResult:
        return self._keep(await self._store.admit(admission))

    async def reject(self, refusal: Refusal) -> RejectResult:
        return self._keep(await self._store.reject(refusal))

    async def reserve_handoffs(self, run_ids: Sequence[str]) -> list[HandoffFacts | None]:
        if not run_ids:
            return []
        return await self._store.reserve_handoffs(run_ids)

    async def claim_many(self, claims: Sequence[Claim], now: float) -> list[ClaimResult]:
        if not claims:
            return []
        return self._keep_all(await self._store.claim_many(claims, now))

    async def start_many(self, starts: Sequence[Start], now: float) -> list[StartResult]:
        if not starts:
            return []
        return self._keep_all(await self._store.start_many(starts, now))

    async def adopt_many(self, adoptions: Sequence[Adoption], now: float) -> list[StartResult]:
        if not adoptions:
            return []
        return self._keep_all(await self._store.adopt_many(adoptions, now))

    async def finish_many(self, endings: Sequence[Ending], now: float) -> list[FinishResult]:
        if not endings:
            return []
        return self._keep_all(await self._store.finish_many(endings, now))

    async def finish(self, ending: Ending, now: float) -> FinishResult:
        return (await self.finish_many([ending], now))[0]

    async def unqueue(self, run: Run, ending: QueueEnding, now: float) -> UnqueueResult:
        return self._keep(await self._store.unqueue(run, ending, now))

    async def requeue(self, run: Run, *, reason: str, now: float) -> RequeueResult:
        return self._keep(await self._store.requeue(run, reason=reason, now=now))

    async def reorder(
        self, run: Run, *, score: float, priority: Priority, event: str, now: float
    ) -> ReorderResult:
        return self._keep(
            await self._store.reorder(run, score=score, priority=priority, event=event, now=now)
        )

    async def request_cancel(self, run: Run, *, reason: str, now: float) -> CancelResult:
        return self._keep(await self._store.request_cancel(run, reason=reason, now=now))


class Lifecycle:
    """Opens windows of transitions over one run store and one publisher."""

    def __init__(self, store: RunTransitions, publisher: Publisher) -> None:
        self.store = store
        self.publisher = publisher
        self._background: set[asyncio.Task[bool]] = set()

    @asynccontextmanager
    async def window(self, *, wait: bool = True) -> AsyncIterator[Window]:
        """Record transitions in the window; publish all their messages when it closes (also
        when the block raised: what was recorded is published, the rest never happened).

        ``wait=False`` publishes in the background, for a caller whose next step must not
        wait for the confirms (a worker starting flows): the messages are in the outbox
        already, so a crash before they are confirmed leaves them to the relay.
        """
        window = Window(self.store)
        try:
            yield window
        finally:
            if window.messages and wait:
                await self.publisher.send(window.messages)
            elif window.messages:
                task = asyncio.create_task(self.publisher.send(window.messages))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                window.sending = task

    async def aclose(self) -> None:
        """Finish the publisher's work, background windows included (at shutdown)."""
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.publisher.aclose()

    async def relay(self, older_than_s: float) -> int:
        """Publish the outbox entries older than ``older_than_s`` (a dead process left them)."""
        return await self.publisher.relay(older_than_s)

    # ---- changes that imply no message ----------------------------------------------------
    async def record_reasons(self, target: str, waiting: Waiting, now: float) -> int:
        """Store why lane heads wait (a change also goes into the head run's timeline)."""
        return await self.store.record_reasons(target, waiting, now)

    async def forget_deadline(self, run_id: str) -> None:
        """Drop a run that is no longer queued from the deadline index."""
        await self.store.forget_deadline(run_id)

    async def forget_running(self, run_id: str) -> None:
        """Drop a run that is no longer running from the run-time-limit index."""
        await self.store.forget_running(run_id)
