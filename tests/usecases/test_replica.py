"""A dispatcher replica, in process: what it consumes, and its reactions to heartbeats and
signals."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from dispatcher.core.principals import HELD_FOR_HEADER
from dispatcher.crypto import WorkerKeyPair
from dispatcher.errors import ConfigurationError
from dispatcher.models import Heartbeat
from dispatcher.usecases import replica as replica_module
from dispatcher.usecases.ports import Ack, DeadLetter
from tests.support.builders import credentials, fleet, machine, request_payload, session
from tests.support.constants import ALICE_WIN
from tests.support.fakes import FakeDelivery
from tests.support.world import World

pytestmark = pytest.mark.unit


def bots() -> World:
    machines = (machine("m1", group_id="bots"), machine("m2"))
    connections = (credentials("c1", group_id="bots"),)
    return World(fleet(machines=machines, groups=("bots",), connections=connections))


def heartbeat(world: World, machine_id: str, *sessions: object) -> FakeDelivery:
    beat = Heartbeat(
        machine_id=machine_id,
        worker_id="w1",
        sent_at=world.clock.now,
        sessions=sessions,  # type: ignore[arg-type]
        public_key=world.keys[machine_id].public_key_b64 if machine_id in world.keys else None,
    )
    return FakeDelivery(beat.model_dump_json().encode(), routing_key="")


async def test_a_replica_consumes_its_three_queues_and_asks_for_passes_at_start() -> None:
    world = bots()
    await world.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
    replica = world.dispatcher()
    requested: list[str] = []
    replica.placer.request = lambda *targets: requested.extend(targets)  # type: ignore[method-assign]
    await replica.start()
    try:
        names = world.names
        assert set(world.broker.handlers) == {
            names.requests_queue,
            names.heartbeats_queue,
            names.signals_queue,
        }
        assert requested == ["g:bots"]
    finally:
        await replica.stop()
    assert world.publisher.closed


async def test_a_replica_whose_connection_breaks_while_it_starts_tries_again() -> None:
    world = bots()
    world.broker.refuse_consumers = 2
    replica = world.dispatcher()
    await replica.start()
    try:
        assert len(world.broker.handlers) == 3
    finally:
        await replica.stop()


async def test_heartbeats_record_the_machine_and_a_change_asks_for_a_pass() -> None:
    world = bots()
    replica = world.dispatcher()
    requested: list[str] = []
    replica.placer.request = lambda *targets: requested.extend(targets)  # type: ignore[method-assign]
    first = await replica.handle_heartbeats([heartbeat(world, "m1")])
    assert first == [Ack()] and requested == ["m:m1", "g:bots"]
    requested.clear()
    await replica.handle_heartbeats([heartbeat(world, "m1")])
    assert requested == []  # nothing changed
    await replica.handle_heartbeats([heartbeat(world, "m1", session(ALICE_WIN, "active"))])
    assert requested == ["m:m1", "g:bots"]
    [view] = await world.machines.views([world.fleet.snapshot.machines["m1"]], world.clock.now, 15)
    assert view.online and [s.user for s in view.sessions] == [ALICE_WIN]


async def test_a_heartbeat_of_an_unknown_machine_is_acked_and_garbage_dead_lettered() -> None:
    world = bots()
    replica = world.dispatcher()
    verdicts = await replica.handle_heartbeats(
        [heartbeat(world, "m9"), FakeDelivery(b'{"machine_id": 1}')]
    )
    assert verdicts[0] == Ack()
    assert isinstance(verdicts[1], DeadLetter) and verdicts[1].reason_class == "heartbeat"
    assert world.machines.heartbeats == {}


async def test_signals_count_completions_and_ask_for_the_machine_s_targets() -> None:
    world = bots()
    replica = world.dispatcher()
    requested: list[str] = []
    replica.placer.request = lambda *targets: requested.extend(targets)  # type: ignore[method-assign]
    finished = {
        "machine_id": "m1",
        "target": "g:bots",
        "connection_kind": "credentials",
        "mode": "unattended",
        "status": "failed",
        "error": {"code": "FlowFailed"},
        "started_at": 10.0,
        "finished_at": 12.5,
    }
    signals = [
        FakeDelivery(json.dumps(finished).encode(), routing_key="run.failed"),
        FakeDelivery(b"not json", routing_key="run.failed"),
    ]
    assert await replica.handle_signals(signals) == [Ack(), Ack()]
    assert sorted(requested) == ["g:bots", "m:m1"]
    [completed] = world.metrics.named("run_completed")
    assert completed == ("g:bots", "credentials", "unattended", "failed", "FlowFailed", 2.5)


def sent_by(delivery: FakeDelivery, user_id: str | None) -> FakeDelivery:
    return dataclasses.replace(delivery, user_id=user_id)


async def test_a_heartbeat_is_accepted_only_from_its_machine_or_the_dispatcher() -> None:
    world = bots()
    replica = world.dispatcher()
    names = world.names
    own = sent_by(heartbeat(world, "m1"), names.machine_user("m1"))
    for forged in (
        sent_by(heartbeat(world, "m2"), names.machine_user("m1")),  # another machine's
        sent_by(heartbeat(world, "m2"), names.submitter_user("env1")),
        sent_by(heartbeat(world, "m2"), None),  # no user id
        sent_by(heartbeat(world, "m2"), "someone-else"),
    ):
        [verdict] = await replica.handle_heartbeats([forged])
        assert isinstance(verdict, DeadLetter) and verdict.reason_class == "sender"
        assert "may not speak for it" in verdict.reason
    assert world.machines.heartbeats == {}  # m2 stays offline
    assert world.metrics.named("message_refused") == [("sender",)] * 4
    assert await replica.handle_heartbeats([own, heartbeat(world, "m2")]) == [Ack(), Ack()]
    assert set(world.machines.heartbeats) == {"m1", "m2"}  # its own, and the admin's


def held(delivery: FakeDelivery, first_publisher: str, by: str | None = "guest") -> FakeDelivery:
    """The copy a dispatcher (user ``guest``) publishes again after an outage outlasted its hold."""
    headers = {"x-rundispatch-held": 1, HELD_FOR_HEADER: first_publisher}
    return dataclasses.replace(delivery, user_id=by, headers=headers)


async def test_a_heartbeat_held_through_an_outage_is_still_its_machine_s() -> None:
    world = bots()
    replica = world.dispatcher()
    names = world.names
    for forged in (
        held(heartbeat(world, "m2"), names.machine_user("m1")),  # held, but m1's
        held(heartbeat(world, "m2"), ""),  # held, first published with no user id
        # Only the dispatcher's copies are believed: a machine naming m2 in the header is m1.
        held(heartbeat(world, "m2"), names.machine_user("m2"), by=names.machine_user("m1")),
        held(heartbeat(world, "m2"), "guest", by=None),
    ):
        [verdict] = await replica.handle_heartbeats([forged])
        assert isinstance(verdict, DeadLetter) and verdict.reason_class == "sender", forged
    assert world.machines.heartbeats == {}
    ours = held(heartbeat(world, "m1"), names.machine_user("m1"))
    assert await replica.handle_heartbeats([ours]) == [Ack()]
    assert set(world.machines.heartbeats) == {"m1"}


async def test_a_machine_s_key_is_pinned_and_another_one_refused_until_registration() -> None:
    world = bots()
    replica = world.dispatcher()
    assert await replica.handle_heartbeats([heartbeat(world, "m1")]) == [Ack()]
    pinned = world.keys["m1"].public_key_b64
    world.keys["m1"] = WorkerKeyPair.generate()  # another process, another key
    assert await replica.handle_heartbeats([heartbeat(world, "m1")]) == [Ack()]
    [live, _] = world.machines.heartbeats["m1"]
    assert live.public_key == pinned  # the other key was not recorded
    [view] = await world.machines.views([world.fleet.snapshot.machines["m1"]], world.clock.now, 15)
    assert view.key_mismatch and view.public_key == pinned
    assert world.metrics.named("message_refused") == [("key_mismatch",)]


async def test_a_forged_terminal_event_creates_no_label_series() -> None:
    world = bots()
    replica = world.dispatcher()
    replica.placer.request = lambda *targets: None  # type: ignore[method-assign]
    forged = [
        {"target": f"g:forged-{n}", "connection_kind": "credentials", "mode": "unattended",
         "status": "succeeded"}
        for n in range(3)
    ]  # fmt: skip
    signals = [
        FakeDelivery(json.dumps(event).encode(), routing_key="run.succeeded") for event in forged
    ]
    await replica.handle_signals(signals)
    targets = {call[0] for call in world.metrics.named("run_completed")}
    assert targets == {"other"}


async def test_a_machine_queue_the_broker_refuses_is_declared_again_a_minute_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A queue that exists with other arguments takes an operator: it is not tried at every
    heartbeat nor every second, and does not hold up the other machines' declarations."""
    world = bots()
    replica = world.dispatcher()
    tried: list[str] = []
    declare = world.broker.ensure_machine_queue

    async def ensure(machine_id: str) -> None:
        tried.append(machine_id)
        if machine_id == "m1":
            raise ConfigurationError("queue m1 exists with other arguments")
        await declare(machine_id)

    world.broker.ensure_machine_queue = ensure  # type: ignore[method-assign]
    for _ in range(3):  # heartbeats keep coming
        await replica.handle_heartbeats([heartbeat(world, "m1"), heartbeat(world, "m2")])
        await asyncio.sleep(0.05)
    assert sorted(tried) == ["m1", "m2"]
    assert world.broker.machine_queues == {"m2"}
    assert "queues of machine m1 not declared: queue m1 exists with other arguments" in caplog.text
    world.clock.advance(replica_module.REFUSED_RETRY_S - 1)
    await replica.handle_heartbeats([heartbeat(world, "m1")])
    await asyncio.sleep(0.05)
    assert sorted(tried) == ["m1", "m2"]  # not yet
    world.clock.advance(1)
    await replica.handle_heartbeats([heartbeat(world, "m1")])  # the retry is due
    await asyncio.sleep(0.05)
    assert sorted(tried) == ["m1", "m1", "m2"]
    await replica.stop()


async def test_a_draining_replica_stops_its_sweeps_before_it_stops_consuming_heartbeats() -> None:
    """Sweeping on without heartbeats, a replica alone finds every machine silent: its drain
    outlasting offline_after_s declared live machines offline (tests/e2e/test_drain.py)."""
    world = bots()
    replica = world.dispatcher()
    await replica.start()
    original = world.broker.stop_consuming
    sweeping: list[bool] = []

    async def stop_consuming(timeout_s: float, queues: object = None) -> bool:
        sweeping.append(
            any(
                t.get_name() == replica_module.SWEEPER_TASK and not t.done() for t in replica._tasks
            )
        )
        return await original(timeout_s)

    world.broker.stop_consuming = stop_consuming  # type: ignore[method-assign]
    assert await replica.drain(5.0)
    assert sweeping == [False]
