"""The dispatcher process: the data path from a run request to a queued run, and the
reactions that place runs on machines.

    requests queue ─▶ decode ─▶ admit (pure) ─▶ record (Lua, with outbox) ─▶ publish ─▶ ack
                                                                              └▶ placement pass
    heartbeats ─▶ machine live state ─▶ placement pass when a machine became able to take more
    signals (terminal events, machine changes) ─▶ placement pass for the machine's targets
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from dispatcher.adapters.amqp import (
    TERMINAL_EVENT_KEYS,
    Ack,
    Amqp,
    DeadLetter,
    Verdict,
    retry_for,
)
from dispatcher.adapters.fleet_store import FleetStore
from dispatcher.adapters.machine_store import Leases, MachineStore
from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.records import OutboxMessage
from dispatcher.adapters.redis_store import RunStore
from dispatcher.cancellation import Canceller
from dispatcher.codes import ErrorCode
from dispatcher.core.admission import Rejection, admit
from dispatcher.core.deadlines import queue_deadline
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.ordering import order_score
from dispatcher.errors import NotFound
from dispatcher.handoff import Handoff
from dispatcher.intake import InvalidMessageClass, decode
from dispatcher.metrics_hooks import MetricsHooks, NullMetrics
from dispatcher.models import CancelRequest, ConnectionKind, Heartbeat, RunRequest
from dispatcher.ports import Delivery, TokenSource
from dispatcher.reconcile import Reconciler
from dispatcher.scheduler import Placer
from dispatcher.settings import Settings
from dispatcher.sweeper import Sweeper

log = logging.getLogger(__name__)


class Dispatcher:
    """One dispatcher replica. Several can run at once against the same namespace."""

    def __init__(
        self,
        *,
        settings: Settings,
        amqp: Amqp,
        runs: RunStore,
        fleet: FleetStore,
        machines: MachineStore,
        handoff: Handoff,
        tokens: TokenSource | None = None,
        metrics: MetricsHooks | None = None,
        clock: Callable[[], float] = time.time,
        replica_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.amqp = amqp
        self.runs = runs
        self.fleet = fleet
        self.machines = machines
        self.tokens = tokens
        self.metrics: MetricsHooks = metrics or NullMetrics()
        self.clock = clock
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.publisher = OutboxPublisher(amqp, runs, self.metrics)
        self.placer = Placer(
            settings=settings,
            fleet=fleet,
            runs=runs,
            machines=machines,
            publisher=self.publisher,
            handoff=handoff,
            metrics=self.metrics,
            clock=clock,
        )
        self.canceller = Canceller(runs=runs, publisher=self.publisher, clock=clock)
        self.reconciler = Reconciler(
            settings=settings, runs=runs, publisher=self.publisher, clock=clock
        )
        self.sweeper = Sweeper(
            settings=settings,
            runs=runs,
            machines=machines,
            fleet=fleet,
            placer=self.placer,
            publisher=self.publisher,
            leases=Leases(runs.redis, runs.names, self.replica_id),
            metrics=self.metrics,
            clock=clock,
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Consume the requests, heartbeats and signals queues; start placement and sweeps."""
        names, size = self.runs.names, self.settings.batch_size
        self._tasks = [
            await self.amqp.consume_batches(
                names.requests_queue, self.handle_requests, batch_size=size
            ),
            await self.amqp.consume_batches(
                names.heartbeats_queue, self.handle_heartbeats, batch_size=size
            ),
            await self.amqp.consume_batches(
                names.signals_queue, self.handle_signals, batch_size=size
            ),
            asyncio.create_task(self.placer.run_forever(), name="placer"),
            asyncio.create_task(self.sweeper.run_forever(), name="sweeper"),
        ]
        self.placer.request(*await self.runs.targets())
        log.info("dispatcher %s serving namespace %s", self.replica_id, names.ns)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.publisher.aclose()

    # ---- the data path ------------------------------------------------------------------------
    async def handle_requests(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Decode, admit and record a batch of requests; the verdicts say ack or dead-letter."""
        verdicts: list[Verdict] = []
        work: list[tuple[int, RunRequest | CancelRequest]] = []
        for index, message in enumerate(batch):
            try:
                decoded = decode(
                    message.body,
                    content_type=message.content_type,
                    content_encoding=message.content_encoding,
                    kind="cancel" if message.routing_key == "cancel" else "submit",
                    max_bytes=self.settings.max_request_bytes,
                )
            except InvalidMessageClass as invalid:
                self.metrics.dead_letter(invalid.reason_class)
                log.warning("dead-lettering an invalid request: %s", invalid.reason)
                verdicts.append(DeadLetter(invalid.reason, invalid.reason_class))
                continue
            verdicts.append(Ack())
            work.append((index, decoded))
        if not work:
            return verdicts
        try:
            fleet = await self.fleet.load()
            now = self.clock()
            # A microsecond apart, so runs of one batch keep their arrival order.
            results = await asyncio.gather(
                *(
                    self._record(item, fleet, now + position * 1e-6)
                    for position, (_, item) in enumerate(work)
                ),
                return_exceptions=True,
            )
        except Exception as exc:  # the store is unavailable: every message goes back
            log.warning("store unavailable, %d requests go back to the queue: %s", len(work), exc)
            for index, _ in work:
                verdicts[index] = retry_for(exc)
            return verdicts
        messages: list[OutboxMessage] = []
        targets: set[str] = set()
        for (index, _), result in zip(work, results, strict=True):
            if isinstance(result, NotFound):  # a cancel naming no run: bad input, not an outage
                self.metrics.dead_letter("unknown_run")
                verdicts[index] = DeadLetter(str(result), "unknown_run")
                continue
            if isinstance(result, BaseException):
                log.warning("request could not be recorded, retrying: %r", result)
                verdicts[index] = retry_for(result)
                continue
            target, recorded = result
            messages.extend(recorded)
            if target:
                targets.add(target)
        await self.publisher.send(messages)
        self.placer.request(*targets)
        return verdicts

    async def _record(
        self, item: RunRequest | CancelRequest, fleet: FleetSnapshot, now: float
    ) -> tuple[str | None, Sequence[OutboxMessage]]:
        """Record one decoded request; returns the target to place and messages to publish."""
        if isinstance(item, CancelRequest):
            await self.canceller.cancel(item.run_id, item.reason or "cancelled over AMQP")
            return None, ()
        request = item
        decision = admit(request, fleet)
        connection = fleet.connections.get(request.connection_id)
        kind = connection.kind.value if connection else "unknown"
        target = connection.target.key if connection else "unknown"
        if isinstance(decision, Rejection):
            extra = (
                ["target", json.dumps(target), "connection_kind", json.dumps(kind)]
                if connection
                else []
            )
            outcome = await self.runs.reject(
                request, decision.code, decision.message, now, extra_fields=extra
            )
            if outcome.result == "rejected":
                self.metrics.run_rejected(
                    connection.target.key if connection else None,  # unknown: label "none"
                    connection.kind.value if connection else None,
                    request.mode.value,
                    decision.code.value,
                )
            return None, outcome.messages
        connection = decision.connection
        refresh_expiry = None
        if connection.kind is ConnectionKind.sign_in and self.tokens is not None:
            refresh_expiry = await self.tokens.refresh_token_expiry(connection)
        deadline = queue_deadline(
            enqueued_at=now,
            kind=connection.kind,
            requested_timeout_s=request.queue_timeout_s,
            default_timeout_s=self.settings.queue_timeout_s,
            sign_in_timeout_s=self.settings.sign_in_queue_timeout_s,
            refresh_token_expires_at=refresh_expiry,
        )
        outcome = await self.runs.admit(
            request,
            target=decision.target,
            connection_kind=connection.kind.value,
            score=order_score(request.priority, now, self.settings.priority_boost_s),
            deadline=deadline,
            throttle_limit=self.settings.throttle_per_minute,
            queue_cap=self.settings.queue_cap,
            now=now,
        )
        if outcome.result == "queued":
            self.metrics.run_submitted(decision.target, connection.kind.value, request.mode.value)
            return decision.target, outcome.messages
        if outcome.result == "rejected":
            code = (
                ErrorCode.QueueFull
                if b"QueueFull" in outcome.messages[0].body[-400:]
                else ErrorCode.DesktopFlowsActionThrottled
            )
            self.metrics.run_rejected(
                decision.target, connection.kind.value, request.mode.value, code.value
            )
        return None, outcome.messages

    # ---- reactions ----------------------------------------------------------------------------
    async def handle_heartbeats(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Record machines' live state; place runs where a machine can now take more."""
        verdicts: list[Verdict] = []
        fleet = await self.fleet.load()
        now = self.clock()
        for message in batch:
            try:
                heartbeat = Heartbeat.model_validate_json(message.body)
            except ValidationError as exc:
                self.metrics.dead_letter("heartbeat")
                verdicts.append(
                    DeadLetter(f"not a heartbeat: {exc.error_count()} errors", "heartbeat")
                )
                continue
            if heartbeat.machine_id not in fleet.machines:
                verdicts.append(Ack())  # a worker for a machine not (yet) in the fleet
                continue
            previous, was_offline = await self.machines.record_heartbeat(heartbeat, now)
            await self.reconciler.heartbeat(heartbeat)
            if (
                was_offline
                or previous is None
                or previous.sessions != heartbeat.sessions
                or previous.worker_id != heartbeat.worker_id
                or previous.public_key != heartbeat.public_key
            ):
                self.placer.request(*fleet.targets_of_machine(heartbeat.machine_id))
            verdicts.append(Ack())
        return verdicts

    async def handle_signals(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """A run ended or a machine changed: its machine's targets may place more runs."""
        fleet = self.fleet.cached() or await self.fleet.load()
        targets: set[str] = set()
        for message in batch:
            try:
                data = json.loads(message.body)
                machine_id = data.get("machine_id") if isinstance(data, dict) else None
            except ValueError:
                machine_id = None
            if isinstance(data, dict) and message.routing_key in TERMINAL_EVENT_KEYS:
                self._observe_completion(data)
            if isinstance(machine_id, str):
                targets.update(fleet.targets_of_machine(machine_id))
            elif message.routing_key == "machine.changed":
                targets.update(await self.runs.targets())
        self.placer.request(*targets)
        return [Ack() for _ in batch]

    def _observe_completion(self, record: dict[str, object]) -> None:
        """Count a run's final status once: one replica consumes each terminal event."""
        error = record.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        started, finished = record.get("started_at"), record.get("finished_at")
        duration = (
            float(finished) - float(started)
            if isinstance(started, int | float) and isinstance(finished, int | float)
            else None
        )
        self.metrics.run_completed(
            str(record.get("target") or ""),
            str(record.get("connection_kind") or ""),
            str(record.get("mode") or ""),
            status=str(record.get("status") or ""),
            code=str(code) if code else None,
            duration_s=duration,
        )
