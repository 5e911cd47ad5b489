"""One dispatcher replica: the queues it consumes and the chores it runs. Several replicas can
run at once against the same namespace.

    requests queue ─▶ intake (decode, admit, record, publish) ─▶ placement passes
    heartbeats ─▶ machine live state, reconcile ─▶ a pass when a machine can now take more
    signals (terminal events, machine changes) ─▶ a pass for the machine's targets
    placer, sweeper: background tasks
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from pydantic import ValidationError

from dispatcher.core.fleet import FleetSnapshot
from dispatcher.core.principals import admin_user_of, publisher_of, sender_of
from dispatcher.errors import ConfigurationError
from dispatcher.metrics.hooks import MetricsHooks
from dispatcher.models import Heartbeat, Run
from dispatcher.names import TERMINAL_EVENT_KEYS, Names, event_of
from dispatcher.retry import Backoff, when_reachable
from dispatcher.settings import Settings
from dispatcher.usecases.foresight import Foresight
from dispatcher.usecases.intake import Intake
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.placement import Placer
from dispatcher.usecases.ports import (
    Ack,
    BatchHandler,
    Broker,
    DeadLetter,
    Delivery,
    FleetSource,
    MachineState,
    RunReads,
    Verdict,
)
from dispatcher.usecases.reconcile import Reconciler
from dispatcher.usecases.results import BeatRecorded, HeartbeatOutcome, KeyRefused
from dispatcher.usecases.sweeper import Sweeper
from dispatcher.usecases.worker_link import WorkerRequests

log = logging.getLogger(__name__)
SWEEPER_TASK = "sweeper"

T = TypeVar("T")
# A replica starting while RabbitMQ or Redis restarts waits for them this long.
START_WAIT_S = 120.0
START_BACKOFF = Backoff(first_s=0.2, max_s=2.0)


# Heartbeats handled (recorded, reconciled) per batch; twice as many delivered ahead.
HEARTBEAT_BATCH = 1000
# How long a batch of heartbeats waits for more after its first one: a batch costs about the
# same whatever its size (one script call, one read, one ack), and a heartbeat 100 ms later
# changes nothing (a machine is offline after 15 s of silence).
HEARTBEAT_GATHER_S = 0.1
# Machines whose queues are declared at once (the broker keeps as many declaring channels).
DECLARING_AT_ONCE = 8
# A machine whose queue the broker refuses as declared (it exists with other arguments) is
# declared again at its first heartbeat this much later, not every second: that takes an
# operator.
REFUSED_RETRY_S = 60.0

# What an unknown target is counted as (the metrics' ``other``).
OTHER_TARGET = "other"


class Dispatcher:
    """One replica, composed of its use cases (built by ``dispatcher.bootstrap``)."""

    def __init__(
        self,
        *,
        settings: Settings,
        names: Names,
        broker: Broker,
        runs: RunReads,
        fleet: FleetSource,
        machines: MachineState,
        lifecycle: Lifecycle,
        intake: Intake,
        placer: Placer,
        sweeper: Sweeper,
        reconciler: Reconciler,
        metrics: MetricsHooks,
        replica_id: str,
        worker_requests: WorkerRequests | None = None,
        foresight: Foresight | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.names = names
        self.broker = broker
        self.runs = runs
        self.fleet = fleet
        self.machines = machines
        self.lifecycle = lifecycle
        self.intake = intake
        self.placer = placer
        self.sweeper = sweeper
        self.reconciler = reconciler
        self.metrics = metrics
        self.replica_id = replica_id
        self.worker_requests = worker_requests
        self._queues_declared: set[str] = set()
        self._undeclared: dict[str, None] = {}  # machines whose queues to declare, in order
        self._declaring_now: set[str] = set()
        self._refused_until: dict[str, float] = {}  # refused machine -> when to try again
        self._declaring: asyncio.Task[None] | None = None
        self.foresight = foresight
        self.clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False
        self.admin_user = admin_user_of(settings.amqp_url.get_secret_value())

    async def start(self) -> None:
        """Consume the requests, heartbeats and signals queues; start placement and sweeps.

        A connection that breaks while the replica starts (RabbitMQ or Redis restarting) is
        waited for, up to ``START_WAIT_S``, as when the process connected.
        """
        names, size = self.names, self.settings.batch_size
        consumers: list[tuple[str, BatchHandler]] = [
            (names.requests_queue, self.intake.handle),
            (names.heartbeats_queue, self.handle_heartbeats),
            (names.signals_queue, self.handle_signals),
        ]
        if self.worker_requests is not None:
            consumers.append((names.reports_queue, self.worker_requests.handle))
        for queue, handler in consumers:
            consume = functools.partial(self.broker.consume, queue, handler, batch_size=size)
            if queue == names.heartbeats_queue:
                # A batch of heartbeats costs a few round trips whatever its size: at 10,000
                # machines (2,000 a second) batches of 100 left the replica waiting on them.
                consume = functools.partial(
                    self.broker.consume,
                    queue,
                    handler,
                    batch_size=HEARTBEAT_BATCH,
                    prefetch=2 * HEARTBEAT_BATCH,
                    gather_s=HEARTBEAT_GATHER_S,
                )
            self._tasks.append(await self._when_available(consume))
        self._tasks += [
            asyncio.create_task(self.placer.run_forever(), name="placer"),
            asyncio.create_task(self.sweeper.run_forever(), name=SWEEPER_TASK),
        ]
        if self.foresight is not None:
            self._tasks.append(asyncio.create_task(self.foresight.run_forever(), name="foresight"))
        self.placer.request(*await self._when_available(self.runs.targets))
        log.info("dispatcher %s serving namespace %s", self.replica_id, names.ns)

    async def _when_available(self, step: Callable[[], Awaitable[T]]) -> T:
        return await when_reachable(step, START_WAIT_S, START_BACKOFF)

    async def drain(self, timeout_s: float) -> bool:
        """A graceful stop within ``timeout_s``: stop consuming, finish the messages in hand,
        stop placement and sweeps, publish what the outbox holds. False when it took longer
        (what was not done is redelivered or relayed by another replica)."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        # Sweeps first: the sweeper judges machines by the heartbeats this replica records, and
        # once it stops consuming them a sweep finds every machine silent: alone, a replica
        # whose drain outlasted offline_after_s declared live machines offline and failed
        # their running runs (MachineLost). Another replica's sweeper takes the lease over.
        sweeper = [t for t in self._tasks if t.get_name() == SWEEPER_TASK]
        for task in sweeper:
            task.cancel()
        await asyncio.gather(*sweeper, return_exceptions=True)
        clean = await self.broker.stop_consuming(timeout_s)
        try:
            async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                await self.stop()
        except TimeoutError:
            clean = False
        return clean

    def consuming(self) -> bool:
        """Whether its consumers and background tasks run (readiness)."""
        tasks = self._tasks
        return bool(tasks) and not self.draining and not any(t.done() for t in tasks)

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._declaring] if self._declaring else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.lifecycle.aclose()

    # ---- reactions ----------------------------------------------------------------------------
    async def handle_heartbeats(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """Record machines' live state; place runs where a machine can now take more.

        The batch is recorded in one store call and reconciled in one read: at 10,000
        machines a replica receives thousands of heartbeats a second, most of which only
        prove a machine alive (see bench/README.md, "live fleet")."""
        verdicts: list[Verdict] = []
        fleet = await self.fleet.load()
        now = self.clock()
        accepted: list[Heartbeat] = []
        for message in batch:
            verdicts.append(Ack())
            try:
                heartbeat = Heartbeat.model_validate_json(message.body)
            except ValidationError as exc:
                self.metrics.dead_letter("heartbeat")
                verdicts[-1] = DeadLetter(
                    f"not a heartbeat: {exc.error_count()} errors", "heartbeat"
                )
                continue
            if heartbeat.machine_id not in fleet.machines:
                continue  # a worker for a machine not (yet) in the fleet: acked
            user = publisher_of(self.admin_user, message.user_id, message.headers)
            sender = sender_of(self.names, self.admin_user, user)
            if not sender.speaks_for_machine(heartbeat.machine_id):
                reason = (
                    f"a heartbeat for machine {heartbeat.machine_id} from "
                    f"{sender.describe(user)}, which may not speak for it"
                )
                log.warning("refused %s", reason)
                self.metrics.message_refused("sender")
                self.metrics.dead_letter("sender")
                verdicts[-1] = DeadLetter(reason, "sender")
                continue
            self._declare_queues_of(heartbeat.machine_id)
            accepted.append(heartbeat)
        outcomes = await self.machines.record_heartbeats(accepted, now)
        recorded = [
            h for h, o in zip(accepted, outcomes, strict=True) if isinstance(o, BeatRecorded)
        ]
        await self.reconciler.heartbeats(recorded, fleet)
        heard = [
            (heartbeat.machine_id, heartbeat.sessions)
            for heartbeat, outcome in zip(accepted, outcomes, strict=True)
            if self._react(heartbeat, outcome, fleet)
        ]
        if self.foresight is not None:
            await self.foresight.keep_heartbeat_changes(heard, now)
        return verdicts

    def _declare_queues_of(self, machine_id: str) -> None:
        """A worker may configure nothing: its queues are declared by the dispatcher at its
        first heartbeat (and when it is registered or the fleet is applied). In the background,
        ``DECLARING_AT_ONCE`` machines at a time: a replica starting beside 10,000 machines
        would otherwise hold every heartbeat behind 40,000 declarations and see its machines go
        offline. A worker retries until its queues exist, and an assignment declares its queue
        first."""
        if (
            machine_id in self._queues_declared
            or machine_id in self._undeclared
            or machine_id in self._declaring_now
            or self._refused_until.get(machine_id, 0.0) > self.clock()
        ):
            return
        self._undeclared[machine_id] = None
        if self._declaring is None or self._declaring.done():
            self._declaring = asyncio.create_task(self._declare_queues(), name="machine-queues")

    async def _declare_queues(self) -> None:
        await asyncio.gather(*(self._declare_some_queues() for _ in range(DECLARING_AT_ONCE)))

    async def _declare_some_queues(self) -> None:
        while self._undeclared:
            machine_id = next(iter(self._undeclared))
            # Out of the waiting line while it is declared (another declarer takes the next
            # one); back at its end if the broker refuses.
            del self._undeclared[machine_id]
            self._declaring_now.add(machine_id)
            try:
                await self.broker.ensure_machine_queue(machine_id)
            except ConfigurationError as exc:
                log.error(
                    "queues of machine %s not declared: %s (trying again in %.0f s)",
                    machine_id,
                    exc,
                    REFUSED_RETRY_S,
                )
                self._refused_until[machine_id] = self.clock() + REFUSED_RETRY_S
                continue
            except Exception as exc:  # RabbitMQ away or refusing: try again in a second
                log.warning("queues of machine %s not declared yet: %s", machine_id, exc)
                self._undeclared[machine_id] = None
                await asyncio.sleep(1.0)
                continue
            finally:
                self._declaring_now.discard(machine_id)
            self._queues_declared.add(machine_id)
            self._refused_until.pop(machine_id, None)

    def _react(self, heartbeat: Heartbeat, outcome: HeartbeatOutcome, fleet: FleetSnapshot) -> bool:
        """A pass for the machine's targets when what placement sees of it changed; True
        when the machine came back online or its sessions changed (foresight keeps that)."""
        targets = fleet.targets_of_machine(heartbeat.machine_id)
        match outcome:
            case KeyRefused():
                log.warning(
                    "refused a heartbeat of machine %s (worker %s): its key is not the one "
                    "pinned at registration; register the machine again to accept a new key",
                    heartbeat.machine_id,
                    heartbeat.worker_id,
                )
                self.metrics.message_refused("key_mismatch")
                self.placer.request(*targets)
            case BeatRecorded(was_offline=was_offline, changed=changed, previous=previous):
                if not (was_offline or changed):
                    return False
                sessions_changed = previous is None or previous.sessions != heartbeat.sessions
                if (
                    was_offline
                    or previous is None
                    or sessions_changed
                    or previous.worker_id != heartbeat.worker_id
                    or previous.public_key != heartbeat.public_key
                ):
                    self.placer.request(*targets)
                return was_offline or sessions_changed
        return False

    async def handle_signals(self, batch: Sequence[Delivery]) -> list[Verdict]:
        """A run ended or a machine changed: its machine's targets may place more runs."""
        fleet = self.fleet.cached() or await self.fleet.load()
        targets: set[str] = set()
        finished: list[Run] = []
        for message in batch:
            try:
                data = json.loads(message.body)
            except ValueError:
                data = None  # a hint that says nothing: only acked
            machine_id = data.get("machine_id") if isinstance(data, dict) else None
            event = event_of(message.routing_key or "")
            if isinstance(data, dict) and event in TERMINAL_EVENT_KEYS:
                self._observe_completion(data, fleet)
                finished.extend(self._traced(data))
            if isinstance(machine_id, str):
                targets.update(fleet.targets_of_machine(machine_id))
            elif message.routing_key == "machine.changed":
                targets.update(await self.runs.targets())
        if self.foresight is not None and finished:
            await self.foresight.keep_finished(finished)
        self.placer.request(*targets)
        return [Ack() for _ in batch]

    def _traced(self, data: dict[str, object]) -> list[Run]:
        """The run of a terminal event, for foresight's trace (an event that does not read is
        skipped: this product published it, a bad one is a bug, not input)."""
        if self.foresight is None:
            return []
        try:
            return [Run.model_validate(data)]
        except ValidationError as exc:
            log.warning("terminal event not traced: %s errors", exc.error_count())
            return []

    def _observe_completion(self, record: dict[str, object], fleet: FleetSnapshot) -> None:
        """Count a run's final status once: one replica consumes each terminal event. A
        target the fleet does not have is counted as ``other``: an event anyone could
        publish must not create label series."""
        error = record.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        started, finished = record.get("started_at"), record.get("finished_at")
        duration = (
            float(finished) - float(started)
            if isinstance(started, int | float) and isinstance(finished, int | float)
            else None
        )
        target = str(record.get("target") or "")
        kind, _, target_id = target.partition(":")
        known = (kind == "m" and target_id in fleet.machines) or (
            kind == "g" and target_id in fleet.groups
        )
        self.metrics.run_completed(
            target if known or not target else OTHER_TARGET,
            str(record.get("connection_kind") or ""),
            str(record.get("mode") or ""),
            status=str(record.get("status") or ""),
            code=str(code) if code else None,
            duration_s=duration,
        )
