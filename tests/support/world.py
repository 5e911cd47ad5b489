"""An in-process dispatcher and machine workers: the use cases wired to the in-memory fakes.

``World`` builds what ``dispatcher.bootstrap`` builds (intake, placer, sweeper, reconciler,
canceller, the replica) on a :class:`~tests.support.fakes.FakeRunStore`, with a clock the test
moves, and offers the few steps tests repeat: submit, heartbeat, place, read a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dispatcher.core.fleet import FleetSnapshot
from dispatcher.crypto import WorkerKeyPair, seal_to
from dispatcher.models import Heartbeat, Run, Session
from dispatcher.names import Names
from dispatcher.settings import Settings
from dispatcher.usecases.cancel import Canceller
from dispatcher.usecases.foresight import Foresight
from dispatcher.usecases.handoff import Handoff
from dispatcher.usecases.intake import Intake
from dispatcher.usecases.lifecycle import Lifecycle
from dispatcher.usecases.placement import Placer
from dispatcher.usecases.ports import Verdict
from dispatcher.usecases.reconcile import Reconciler
from dispatcher.usecases.replica import Dispatcher
from dispatcher.usecases.sweeper import Sweeper
from tests.support.builders import request_payload
from tests.support.fakes import (
    Clock,
    FakeBroker,
    FakeDelivery,
    FakeFleet,
    FakeLeases,
    FakeMachines,
    FakePasswords,
    FakePublisher,
    FakeRunStore,
    FakeTokens,
    FakeTraces,
    PassLog,
    RecordingMetrics,
)

NAMESPACE = "inproc"


def settings(**overrides: Any) -> Settings:
    """The dispatcher's settings for in-process tests (explicit values, not the environment's
    defaults, where a test depends on them)."""
    values: dict[str, Any] = {
        "namespace": NAMESPACE,
        "queue_timeout_s": 6 * 3600,
        "sign_in_queue_timeout_s": 3600,
        "max_run_s": 600,
        "throttle_per_minute": 1000,
        "queue_cap": 1000,
        "offline_after_s": 15,
        "running_grace_s": 60,
        "outbox_relay_after_s": 5,
        "priority_boost_s": 3600,
        "heartbeat_interval_s": 5,
    }
    values.update(overrides)
    return Settings(**values)


class World:
    """The dispatcher's use cases over fakes; ``passes`` records what intake, the sweeper and
    the replica ask the placer for (the placer runs only when a test calls ``place``)."""

    def __init__(self, fleet: FleetSnapshot, **setting_overrides: Any) -> None:
        self.settings = settings(**setting_overrides)
        self.names = Names(NAMESPACE)
        self.clock = Clock()
        self.store = FakeRunStore()
        self.machines = FakeMachines(self.store)
        self.fleet = FakeFleet(fleet)
        self.publisher = FakePublisher(self.store)
        self.broker = FakeBroker()
        self.lifecycle = Lifecycle(self.store, self.publisher)
        self.metrics = RecordingMetrics()
        self.tokens = FakeTokens()
        self.passwords = FakePasswords()
        self.passes = PassLog()
        self.keys = {machine_id: WorkerKeyPair.generate() for machine_id in fleet.machines}
        self.handoff = Handoff(
            tokens=self.tokens, passwords=self.passwords, seal=seal_to, token_validity_s=600
        )
        self.placer = Placer(
            settings=self.settings,
            fleet=self.fleet,
            runs=self.store,
            machines=self.machines,
            lifecycle=self.lifecycle,
            handoff=self.handoff,
            metrics=self.metrics,
            clock=self.clock,
        )
        self.canceller = Canceller(runs=self.store, lifecycle=self.lifecycle, clock=self.clock)
        self.intake = Intake(
            settings=self.settings,
            fleet=self.fleet,
            lifecycle=self.lifecycle,
            canceller=self.canceller,
            placer=self.passes,
            metrics=self.metrics,
            tokens=self.tokens,
            clock=self.clock,
        )
        self.traces = FakeTraces()
        self.foresight = Foresight(
            settings=self.settings, runs=self.store, machines=self.machines, fleet=self.fleet,
            traces=self.traces, lifecycle=self.lifecycle, clock=self.clock,
        )  # fmt: skip
        self.sweeper = Sweeper(
            settings=self.settings,
            runs=self.store,
            machines=self.machines,
            lifecycle=self.lifecycle,
            placer=self.passes,
            leases=FakeLeases(),
            clock=self.clock,
            foresight=self.foresight,
        )
        self.reconciler = Reconciler(
            settings=self.settings, runs=self.store, lifecycle=self.lifecycle, clock=self.clock
        )

    def dispatcher(self) -> Dispatcher:
        """The replica composed of this world's use cases."""
        return Dispatcher(
            settings=self.settings,
            names=self.names,
            broker=self.broker,
            runs=self.store,
            fleet=self.fleet,
            machines=self.machines,
            lifecycle=self.lifecycle,
            intake=self.intake,
            placer=self.placer,
            sweeper=self.sweeper,
            reconciler=self.reconciler,
            metrics=self.metrics,
            replica_id="replica-1",
            clock=self.clock,
            foresight=self.foresight,
        )

    # ---- steps tests repeat --------------------------------------------------------------
    async def submit(
        self, *bodies: dict[str, Any] | bytes, routing_key: str = "submit"
    ) -> list[Verdict]:
        """Hand one batch of request bodies (payloads or raw bytes) to intake."""
        deliveries = [
            FakeDelivery(
                body if isinstance(body, bytes) else json.dumps(body).encode(), routing_key
            )
            for body in bodies
        ]
        return await self.intake.handle(deliveries)

    async def submit_run(self, run_id: str, **fields: Any) -> Run:
        """Submit one run request and return its record."""
        await self.submit(request_payload(run_id=run_id, **fields))
        return await self.run(run_id)

    async def heartbeat(
        self, machine_id: str, *sessions: Session, worker_id: str = "worker-1", **fields: Any
    ) -> None:
        """Record a heartbeat of ``machine_id`` (with its key) now, as the replica would."""
        heartbeat = Heartbeat(
            machine_id=machine_id,
            worker_id=worker_id,
            sent_at=self.clock(),
            sessions=sessions,
            public_key=self.keys[machine_id].public_key_b64,
            **fields,
        )
        if heartbeat.public_key:
            await self.machines.pin_key(machine_id, heartbeat.public_key, self.clock())
        await self.machines.record_heartbeat(heartbeat, self.clock())

    async def place(self, target: str) -> int:
        return await self.placer.place(target)

    async def run(self, run_id: str) -> Run:
        run = await self.store.get(run_id)
        assert run is not None, f"run {run_id} is not recorded"
        return run

    def ledger_path(self, tmp_path: Path, machine_id: str) -> Path:
        return tmp_path / f"ledger-{machine_id}.jsonl"
