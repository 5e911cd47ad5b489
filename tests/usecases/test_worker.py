"""The machine worker, in process: its link to the dispatcher side over the in-memory store,
its intake (fenced start, ledger), runner, reporter and heartbeats."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dispatcher.codes import ErrorCode
from dispatcher.errors import BrokerUnavailable
from dispatcher.models import Heartbeat, RunStatus
from dispatcher.usecases.ports import Ack, DeadLetter, Retry
from dispatcher.usecases.worker_link import WorkerRequests, encode_outcome
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.fakes import FakeDelivery, RecordingMetrics
from tests.support.processes import eventually
from tests.support.world import World
from workers.adapters.amqp_link import AmqpLink
from workers.adapters.store_link import StoreLink
from workers.executors import CommandExecutor, Executor, SimulateExecutor
from workers.ledger import Ledger
from workers.runner import Executed
from workers.sessions import SessionsFile
from workers.worker import MachineWorker

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

TARGET = "m:m1"


class Machine:
    """The world and the worker of its machine ``m1``."""

    def __init__(self, tmp_path: Path, executor: Executor | None = None) -> None:
        connections = tuple(
            credentials(f"c{i}", machine_id="m1", username=f"CONTOSO\\svc{i}") for i in (1, 2, 3)
        )
        self.world = World(fleet(machines=(machine("m1", slots=3),), connections=connections))
        self.ledger = Ledger(tmp_path / "ledger.jsonl")
        self.metrics = RecordingMetrics()
        self.link = StoreLink(
            machine_id="m1",
            worker_id="w1",
            names=self.world.names,
            broker=self.world.broker,
            lifecycle=self.world.lifecycle,
            runs=self.world.store,
            machines=self.world.machines,
            clock=self.world.clock,
        )
        self.worker = MachineWorker(
            settings=self.world.settings,
            machine_id="m1",
            link=self.link,
            executor=executor or SimulateExecutor(),
            keys=self.world.keys["m1"],
            ledger=self.ledger,
            sessions=SessionsFile(None),
            metrics=self.metrics,
            worker_id="w1",
            clock=self.world.clock,
        )

    async def dispatch(self, run_id: str, connection: str = "c1", **inputs: object) -> FakeDelivery:
        """Submit a run, place it on m1, return the assignment as the worker receives it."""
        world = self.world
        await world.heartbeat("m1", worker_id="w1")
        payload = request_payload(
            run_id=run_id, connection_id=connection, mode="unattended", inputs=inputs
        )
        await world.submit(payload)
        await world.place(TARGET)
        [assign] = [
            message
            for message in world.publisher.of_kind("assign")
            if json.loads(message.body)["request"]["run_id"] == run_id
        ][-1:]
        return FakeDelivery(assign.body, routing_key="m1", type="assign")

    async def finish_one(self) -> Executed:
        """Wait for the next flow to end and report it."""
        executed = await self.worker.runner.done.get()
        await self.worker.reporter.report([executed])
        return executed

    def started(self) -> list[str]:
        lines = [json.loads(line) for line in self.ledger.path.read_text().splitlines()]
        return [entry["run_id"] for entry in lines if entry["event"] == "started"]


MachineFactory = Callable[..., Machine]


@pytest.fixture
async def machines(tmp_path: Path) -> AsyncIterator[MachineFactory]:
    """Builds ``Machine``s; closes their ledgers and stops their flows afterwards."""
    built: list[Machine] = []

    def build(executor: Executor | None = None) -> Machine:
        built.append(Machine(tmp_path / f"m{len(built)}", executor))
        return built[-1]

    yield build
    for m in built:
        for item in m.worker.runs.running.values():
            item.task.cancel()
        await asyncio.gather(
            *(item.task for item in m.worker.runs.running.values()), return_exceptions=True
        )
        await m.world.lifecycle.aclose()
        m.ledger.close()


async def test_an_assignment_is_started_once_run_and_its_outcome_reported(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=0)
    assert await m.worker.intake.handle([delivery]) == [Ack()]
    assert m.started() == ["r1"]
    assert (await m.world.run("r1")).status is RunStatus.running
    await asyncio.sleep(0)  # the started event is published in the background
    assert [e["run_id"] for e in m.world.publisher.events("run.started")] == ["r1"]
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.succeeded
    run = await m.world.run("r1")
    assert run.status is RunStatus.succeeded
    assert run.outputs == {"simulated": True, "duration_s": 0}
    assert m.worker.runs.running == {}
    assert [f.run_id for f in m.worker.runs.finished] == ["r1"]
    assert m.metrics.named("run_executed")[0][0] == "succeeded"
    assert await m.world.machines.assigned("m1") == []


async def test_a_redelivered_assignment_is_refused_by_the_ledger(machines: MachineFactory) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=0)
    await m.worker.intake.handle([delivery])
    await m.finish_one()
    assert await m.worker.intake.handle([delivery]) == [Ack()]
    assert m.started() == ["r1"]
    assert m.worker.runs.running == {}


async def test_the_ledger_refuses_a_run_the_store_forgot_it_started(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    # The worker restarts, and Redis lost the start (a crash inside its AOF window): the
    # assignment comes again and the store would let it start under the same fence.
    m.worker.runs.running.pop("r1").task.cancel()
    m.world.store.runs["r1"]["status"] = '"dispatched"'
    assert await m.worker.intake.handle([delivery]) == [Ack()]
    assert m.started() == ["r1"]
    assert m.worker.runs.running == {}


async def test_a_stale_assignment_is_refused_by_the_fenced_start(machines: MachineFactory) -> None:
    m = machines()
    stale = await m.dispatch("r1", duration_s=0)
    run = await m.world.run("r1")
    await m.world.store.requeue(run, reason="machine offline", now=m.world.clock.now)
    await m.world.place(TARGET)  # handed again, under a new fence
    assert await m.worker.intake.handle([stale]) == [Ack()]
    assert m.started() == []
    assert (await m.world.run("r1")).status is RunStatus.dispatched


async def test_a_stale_and_the_current_assignment_in_one_batch_start_the_run_once(
    machines: MachineFactory,
) -> None:
    m = machines()
    stale = await m.dispatch("r1", duration_s=0)
    run = await m.world.run("r1")
    await m.world.store.requeue(run, reason="machine offline", now=m.world.clock.now)
    await m.world.place(TARGET)  # handed again, under a new fence
    [current] = [
        FakeDelivery(message.body, routing_key="m1", type="assign")
        for message in m.world.publisher.of_kind("assign")
    ][-1:]
    assert await m.worker.intake.handle([stale, current]) == [Ack(), Ack()]
    assert m.started() == ["r1"]
    started = await m.world.run("r1")
    assert started.status is RunStatus.running and started.fence == run.fence + 1


async def test_an_assignment_for_another_machine_or_not_an_assignment_is_dead_lettered(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1")
    foreign = FakeDelivery(delivery.body.replace(b'"machine_id":"m1"', b'"machine_id":"m9"', 1))
    verdicts = await m.worker.intake.handle([foreign, FakeDelivery(b"{}")])
    assert all(isinstance(v, DeadLetter) for v in verdicts)
    assert m.started() == []


async def test_an_assignment_whose_flow_or_inputs_were_swapped_is_refused_unrun(
    machines: MachineFactory,
) -> None:
    m = machines()
    first = await m.dispatch("r1", duration_s=0)
    second = await m.dispatch("r2", "c2", duration_s=0)
    swapped_flow = FakeDelivery(first.body.replace(b'"flow_id":"flow-1"', b'"flow_id":"pay"', 1))
    swapped_inputs = FakeDelivery(second.body.replace(b'"duration_s":0', b'"duration_s":1', 1))
    assert swapped_flow.body != first.body and swapped_inputs.body != second.body
    verdicts = await m.worker.intake.handle([swapped_flow, swapped_inputs])
    assert [(type(v), getattr(v, "reason_class", None)) for v in verdicts] == [
        (DeadLetter, "handoff")
    ] * 2
    for _ in range(2):
        executed = await m.finish_one()
        assert executed.outcome.status is RunStatus.failed
        assert executed.code is ErrorCode.FlowFailed
    for run_id in ("r1", "r2"):
        run = await m.world.run(run_id)
        assert run.status is RunStatus.failed and run.outputs is None
        assert run.error is not None and "sealed secret does not open" in run.error.message
    assert m.metrics.named("executor_error") == [("handoff_refused",)] * 2


async def test_a_start_the_dispatcher_side_cannot_record_is_retried(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1")
    m.world.store.unavailable = True
    [verdict] = await m.worker.intake.handle([delivery])
    assert isinstance(verdict, Retry) and verdict.outage
    assert m.started() == []


async def test_a_cancel_stops_the_running_flow(machines: MachineFactory) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    await asyncio.sleep(0)  # the flow runs
    await m.world.canceller.cancel("r1", "stop")
    [cancel] = m.world.publisher.of_kind("cancel")
    assert await m.worker.intake.handle([FakeDelivery(cancel.body, type="cancel")]) == [Ack()]
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.cancelled
    run = await m.world.run("r1")
    assert run.status is RunStatus.cancelled
    assert run.error is not None and run.error.message == "stop"


async def test_a_run_stopped_before_its_flow_began_still_ends_cancelled(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    assert m.worker.runs.stop("r1", "too early")  # before the flow's task ever ran
    executed = await m.finish_one()
    assert (executed.outcome.status, executed.code) == (RunStatus.cancelled, ErrorCode.Cancelled)
    assert (await m.world.run("r1")).status is RunStatus.cancelled


async def test_a_flow_the_dispatcher_ended_meanwhile_is_dropped(machines: MachineFactory) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    await asyncio.sleep(0)  # the flow runs
    sweeper, clock = m.world.sweeper, m.world.clock
    await sweeper.check_liveness(clock.advance(m.world.settings.offline_after_s + 1))
    await sweeper.check_liveness(clock.advance(m.world.settings.running_grace_s))  # lost: failed
    assert (await m.world.run("r1")).status is RunStatus.failed
    await m.worker.heartbeats.drop_abandoned()
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.cancelled
    assert (await m.world.run("r1")).error.code is ErrorCode.MachineLost  # type: ignore[union-attr]


async def test_runs_cut_short_by_a_restart_are_reported_failed_not_run_again(
    machines: MachineFactory,
) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    m.worker.runs.running.pop("r1").task.cancel()  # the process died: a new worker starts
    await m.worker.reconcile()
    run = await m.world.run("r1")
    assert run.status is RunStatus.failed
    assert run.error is not None and run.error.code is ErrorCode.WorkerRestarted
    lines = [json.loads(line) for line in m.ledger.path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["started", "abandoned"]


async def test_a_heartbeat_tells_the_machine_s_state(machines: MachineFactory) -> None:
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    await m.worker.heartbeats.send()
    role, _, body, kind = m.world.broker.published[-1]
    heartbeat = Heartbeat.model_validate_json(body)
    assert (role, kind, heartbeat.machine_id, heartbeat.worker_id) == (
        "heartbeats",
        "heartbeat",
        "m1",
        "w1",
    )
    assert [(r.run_id, r.fence) for r in heartbeat.running] == [("r1", 1)]
    assert heartbeat.public_key == m.world.keys["m1"].public_key_b64
    assert m.metrics.named("heartbeat_sent") == [()]
    m.world.broker.down = True
    await m.worker.heartbeats.send()
    assert m.metrics.named("heartbeat_failed") == [()]
    m.worker.runs.stop("r1", "end of test")
    await m.finish_one()


async def beat_quickly_until(m: Machine, condition: Callable[[], bool]) -> None:
    """Run the worker's heartbeat loop every 0.05 s until ``condition`` holds, then stop it."""
    heartbeats = m.worker.heartbeats
    heartbeats.settings = heartbeats.settings.model_copy(update={"heartbeat_interval_s": 0.05})
    beating = asyncio.create_task(heartbeats.beat_forever())
    try:
        await eventually(condition, timeout=10)
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)


async def test_heartbeats_go_on_while_the_check_of_running_runs_waits_for_an_answer(
    machines: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer lost under a connection cut holds the check of running runs up to the
    link's reply time-out; the heartbeats go on meanwhile. Held up behind it for longer than
    ``offline_after_s``, the machine was declared offline and its running runs failed
    MachineLost while their flows ran."""
    m = machines()
    delivery = await m.dispatch("r1", duration_s=60)
    await m.worker.intake.handle([delivery])
    asked: list[list[str]] = []

    async def unanswered(run_ids: list[str]) -> list[Any]:
        asked.append(list(run_ids))
        await asyncio.Event().wait()  # the answer never comes
        return []

    monkeypatch.setattr(m.link, "run_states", unanswered)

    def sent() -> int:
        return sum(1 for _, _, _, kind in m.world.broker.published if kind == "heartbeat")

    before = sent()
    await beat_quickly_until(m, lambda: bool(asked) and sent() >= before + 5)
    assert asked[0] == ["r1"]
    assert len(asked) == 1, "a second check started while the first still waited"
    m.worker.runs.stop("r1", "end of test")
    await m.finish_one()


async def test_a_heartbeat_whose_confirm_never_comes_does_not_stop_the_next(
    machines: MachineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = machines()
    published: list[Heartbeat] = []

    async def unconfirmed(heartbeat: Heartbeat) -> None:
        published.append(heartbeat)
        await asyncio.Event().wait()  # the confirm never comes

    monkeypatch.setattr(m.link, "heartbeat", unconfirmed)
    await beat_quickly_until(m, lambda: len(published) >= 3)
    assert m.metrics.named("heartbeat_failed")[:2] == [(), ()]
    assert not m.metrics.named("heartbeat_sent")


async def test_an_executor_that_cannot_run_the_flow_is_counted(
    machines: MachineFactory, tmp_path: Path
) -> None:
    m = machines(CommandExecutor({}, [str(tmp_path / "no-such-program")]))
    delivery = await m.dispatch("r1")
    await m.worker.intake.handle([delivery])
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.failed
    assert m.metrics.named("executor_error") == [("start_failed",)]
    assert (await m.world.run("r1")).error.code is ErrorCode.FlowFailed  # type: ignore[union-attr]


async def test_a_flow_past_its_time_limit_is_stopped_and_counted(
    machines: MachineFactory, tmp_path: Path
) -> None:
    program = tmp_path / "slow.py"
    program.write_text("import time; time.sleep(30)\n")
    m = machines(CommandExecutor({}, [sys.executable, str(program)]))
    delivery = await m.dispatch("r1")
    assignment = json.loads(delivery.body)
    assignment["request"]["max_run_s"] = 0.2
    await m.worker.intake.handle([FakeDelivery(json.dumps(assignment).encode(), type="assign")])
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.failed
    assert executed.code is ErrorCode.DesktopFlowsActionTimeout
    assert m.metrics.named("executor_error") == [("timeout",)]


async def test_over_amqp_the_worker_s_requests_are_answered_and_only_for_its_machine(
    machines: MachineFactory,
) -> None:
    """The worker's AMQP link against the dispatcher's side of it (``WorkerRequests``), the
    broker in between faked: starts, outcomes and queries go out as requests and come back as
    answers; a request naming another machine than its sender is dead-lettered."""
    m = machines()
    world = m.world
    requests = WorkerRequests(
        settings=world.settings,
        broker=world.broker,
        lifecycle=world.lifecycle,
        runs=world.store,
        machines=world.machines,
        metrics=world.metrics,
        clock=world.clock,
    )
    sender = world.names.machine_user("m1")

    class Loopback:
        """Hands every request to the dispatcher's side at once and routes its answer back."""

        def __init__(self) -> None:
            self.replies: Any = None

        async def consume(self, queue: str, handler: Any, **_: Any) -> asyncio.Task[None]:
            self.replies = handler
            return asyncio.create_task(asyncio.sleep(3600))

        async def publish_json(self, role: str, key: str, body: bytes, **_: Any) -> None:
            assert (role, key) == ("reports", "report")
            before = len(world.broker.published)
            [verdict] = await requests.handle([FakeDelivery(body, key, user_id=sender)])
            assert verdict == Ack()
            for _, _, answer, _ in world.broker.published[before:]:
                await self.replies([FakeDelivery(answer, "m1.replies")])

    link = AmqpLink(machine_id="m1", worker_id="w1", names=world.names, broker=Loopback())  # type: ignore[arg-type]
    m.worker.intake.link = link
    m.worker.reporter.link = link
    delivery = await m.dispatch("r1", duration_s=0)
    assert await m.worker.intake.handle([delivery]) == [Ack()]
    assert (await world.run("r1")).status is RunStatus.running
    assert [r.run_id for r in await link.running_here()] == ["r1"]
    executed = await m.finish_one()
    assert executed.outcome.status is RunStatus.succeeded
    assert (await world.run("r1")).status is RunStatus.succeeded
    [state] = await link.run_states(["r1"])
    assert state.status is RunStatus.succeeded
    await link.aclose()

    forged = {"op": "finish", "machine_id": "m2", "worker_id": "w9", "correlation_id": "x",
              "outcomes": []}  # fmt: skip
    [verdict] = await requests.handle([FakeDelivery(json.dumps(forged).encode(), user_id=sender)])
    assert isinstance(verdict, DeadLetter) and verdict.reason_class == "sender"


async def test_a_start_or_an_outcome_asked_again_is_answered_as_the_first_time(
    machines: MachineFactory,
) -> None:
    """A worker whose answer was lost (its replies queue gone with a node, a publish never
    confirmed) asks again: the same fenced start is answered ``started`` again and the same
    outcome ``finished`` again; the run started once and ended once."""
    m = machines()
    world = m.world
    requests = WorkerRequests(
        settings=world.settings,
        broker=world.broker,
        lifecycle=world.lifecycle,
        runs=world.store,
        machines=world.machines,
        metrics=world.metrics,
        clock=world.clock,
    )
    sender = world.names.machine_user("m1")
    delivery = await m.dispatch("r1", duration_s=0)
    fence = json.loads(delivery.body)["fence"]
    asked = {"machine_id": "m1", "worker_id": "w1", "correlation_id": "c"}
    start = {
        **asked,
        "op": "start",
        "starts": [{"run_id": "r1", "fence": fence, "deadline": world.clock() + 600}],
    }
    outcome = encode_outcome("r1", fence, RunStatus.succeeded, None, {"rows": 1})
    finish = {**asked, "op": "finish", "outcomes": [outcome]}  # fmt: skip
    answers = []
    for request in (start, start, finish, finish):
        before = len(world.broker.published)
        body = json.dumps(request).encode()
        assert await requests.handle([FakeDelivery(body, user_id=sender)]) == [Ack()]
        [reply] = [b for _, _, b, kind in world.broker.published[before:] if kind == "reply"]
        answers.append(json.loads(reply)["results"])
    assert answers == [[{"result": "started"}]] * 2 + [[{"result": "finished"}]] * 2
    run = await world.run("r1")
    assert run.status is RunStatus.succeeded and run.outputs == {"rows": 1}
    await asyncio.sleep(0)  # the events are published in the background
    assert [e["run_id"] for e in world.publisher.events("run.started")] == ["r1"]
    assert [e["run_id"] for e in world.publisher.events("run.succeeded")] == ["r1"]


async def test_an_answer_that_does_not_come_is_asked_again_on_a_new_consumer(
    machines: MachineFactory,
) -> None:
    """A replies consumer that stays silent (restored on a quorum queue with no leader yet):
    the request times out, the link cancels that consumer, and the request asked again is
    answered through a new one."""
    m = machines()
    world = m.world
    requests = WorkerRequests(
        settings=world.settings,
        broker=world.broker,
        lifecycle=world.lifecycle,
        runs=world.store,
        machines=world.machines,
        metrics=world.metrics,
        clock=world.clock,
    )
    sender = world.names.machine_user("m1")

    class SilentFirstConsumer:
        """Answers every request, but nothing reaches the first replies consumer."""

        def __init__(self) -> None:
            self.handlers: list[Any] = []
            self.stopped: list[list[str]] = []

        async def consume(self, queue: str, handler: Any, **_: Any) -> asyncio.Task[None]:
            self.handlers.append(handler)
            return asyncio.create_task(asyncio.sleep(3600))

        async def stop_consuming(self, timeout_s: float, queues: Any = None) -> bool:
            self.stopped.append(list(queues or []))
            return True

        async def publish_json(self, role: str, key: str, body: bytes, **_: Any) -> None:
            before = len(world.broker.published)
            await requests.handle([FakeDelivery(body, key, user_id=sender)])
            if len(self.handlers) > 1:
                for _, _, answer, kind in world.broker.published[before:]:
                    if kind == "reply":
                        await self.handlers[-1]([FakeDelivery(answer, "m1.replies")])

    broker = SilentFirstConsumer()
    link = AmqpLink(
        machine_id="m1", worker_id="w1", names=world.names, broker=broker,  # type: ignore[arg-type]
        reply_timeout_s=0.2,
    )  # fmt: skip
    with pytest.raises(BrokerUnavailable, match="no answer"):
        await link.running_here()
    assert broker.stopped == [[world.names.machine_replies_queue("m1")]]
    assert await link.running_here() == []
    assert len(broker.handlers) == 2
    await link.aclose()
