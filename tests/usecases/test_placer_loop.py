"""The placer's loop, in process: passes asked for are coalesced and run in target order; a
pass that fails is asked for again once, later, and the log says which target failed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from dispatcher.models import RunStatus
from dispatcher.usecases.placement import RETRY_AFTER_S
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.world import World

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def world() -> World:
    connections = (credentials("c1", group_id="bots"),)
    return World(fleet(machines=(machine("m1", group_id="bots"),), groups=("bots",),
                       connections=connections))  # fmt: skip


async def test_passes_are_coalesced_run_in_order_and_a_failed_one_is_asked_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    placer = world().placer
    passes: list[str] = []
    done = asyncio.Event()

    async def place(target: str, *, overlap: bool) -> int:
        assert overlap  # the loop's passes overlap their windows' confirms
        passes.append(target)
        if target == "g:broken":
            raise RuntimeError("the pass broke")
        if len(passes) == 3:
            done.set()
        return 0

    async def targets() -> list[str]:  # the targets with queued runs ("m:idle" has none)
        return ["g:broken", "m:a", "m:b", "m:c"]

    placer._pass = place  # type: ignore[method-assign]
    placer.runs.targets = targets  # type: ignore[method-assign]
    placer.request("m:b", "g:broken", "m:idle")
    placer.request("m:a", "m:b")  # coalesced with the pass already asked for
    loop_task = asyncio.create_task(placer.run_forever())
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
        assert passes == ["g:broken", "m:a", "m:b"]
        handle = placer._retry_handles["g:broken"]
        assert handle.when() - asyncio.get_running_loop().time() > RETRY_AFTER_S - 0.5
        assert "placement pass for g:broken failed; retrying soon" in caplog.text
        assert "the pass broke" in caplog.text
        # Asked again while a retry is pending: still one retry.
        placer.request_later("g:broken", 0.0)
        assert placer._retry_handles["g:broken"] is handle
        # The loop keeps going after a failed pass.
        done.clear()
        passes.clear()
        placer.request("m:c")
        await asyncio.wait_for(_until(lambda: passes == ["m:c"]), timeout=10)
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        for pending in placer._retry_handles.values():
            pending.cancel()


async def test_a_retry_asks_for_its_target_once_when_it_fires() -> None:
    placer = world().placer
    asked: list[str] = []
    placer.request = lambda *targets: asked.extend(targets)  # type: ignore[method-assign]
    placer.request_later("g:bots", 0.0)
    placer.request_later("g:bots", 0.0)
    assert list(placer._retry_handles) == ["g:bots"]
    await _until(lambda: asked == ["g:bots"])
    assert placer._retry_handles == {}
    placer.request_later("g:bots", 0.0)  # a new retry once the first one fired
    await _until(lambda: asked == ["g:bots", "g:bots"])


async def test_a_pass_over_a_target_without_queued_runs_places_nothing() -> None:
    w = world()
    await w.heartbeat("m1")
    assert await w.place("g:bots") == 0
    await w.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
    assert await w.place("g:bots") == 1
    assert (await w.run("r1")).status is RunStatus.dispatched
    assert await w.place("g:bots") == 0


async def test_the_lifecycle_forgets_index_entries_and_relays_through_its_publisher() -> None:
    w = world()
    await w.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
    assert "r1" in await w.store.due_deadlines(w.clock.now + 10**6)
    await w.lifecycle.forget_deadline("r1")
    assert "r1" not in await w.store.due_deadlines(w.clock.now + 10**6)
    w.store.running["r1"] = w.clock.now
    await w.lifecycle.forget_running("r1")
    assert "r1" not in w.store.running
    seen: list[float] = []

    async def relay(older_than_s: float) -> int:
        seen.append(older_than_s)
        return 0

    w.publisher.relay = relay  # type: ignore[method-assign]
    await w.lifecycle.relay(7.5)
    assert seen == [7.5]


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (a number of turns, not a time)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_reasons_are_due_when_new_when_changed_after_a_while_or_unchanged_for_long() -> None:
    from dispatcher.usecases.placement import REASONS_MIN_INTERVAL_S, REASONS_RECHECK_S

    placer = world().placer
    later: list[tuple[str, float]] = []
    placer.request_later = lambda t, s: later.append((t, s))  # type: ignore[method-assign]
    offline = {"lane-a": ("r1", {"m1": "MachineOffline"})}
    busy = {"lane-a": ("r1", {"m1": "NoFreeSlot"})}
    t0 = 1_000.0
    assert placer._reasons_due("g:x", dict(offline), t0) == offline  # new
    assert placer._reasons_due("g:y", dict(offline), t0) == offline  # another target
    assert placer._reasons_due("g:x", dict(offline), t0 + REASONS_RECHECK_S - 0.001) == {}
    assert placer._reasons_due("g:x", dict(offline), t0 + REASONS_RECHECK_S) == offline
    t1 = t0 + REASONS_RECHECK_S
    assert later == []
    # Changed, but too soon after the last write: deferred, and a pass asked for then.
    assert placer._reasons_due("g:x", dict(busy), t1 + REASONS_MIN_INTERVAL_S - 0.001) == {}
    assert later == [("g:x", REASONS_MIN_INTERVAL_S)]
    assert placer._reasons_due("g:x", dict(busy), t1 + REASONS_MIN_INTERVAL_S) == busy
    # Lanes are judged one by one: an unchanged one does not hide a new one after it.
    t2 = t1 + REASONS_MIN_INTERVAL_S
    both = {**busy, "lane-b": ("r2", {"m1": "NoFreeSlot"})}
    assert placer._reasons_due("g:x", dict(both), t2 + 0.1) == {"lane-b": both["lane-b"]}


async def test_a_pass_reports_how_long_its_decision_took() -> None:
    import time

    w = world()
    await w.heartbeat("m1")
    await w.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
    before = time.perf_counter()
    await w.place("g:bots")
    took = time.perf_counter() - before
    [(latency,)] = w.metrics.named("decision_latency")
    assert 0.0 < latency <= took


async def test_a_pass_claims_while_the_last_one_is_confirmed_and_its_window_waits_for_it() -> None:
    """The loop's passes overlap the confirms of the pass before: the next pass reads and
    claims while RabbitMQ confirms the last window, and its own window goes out only once that
    one is confirmed (at most two in flight, in order)."""
    connections = tuple(
        credentials(f"c{i}", group_id="bots", username=f"CONTOSO\\svc{i}") for i in (1, 2)
    )
    w = World(fleet(machines=(machine("m1", group_id="bots", slots=2),), groups=("bots",),
                    connections=connections))  # fmt: skip
    await w.heartbeat("m1")
    confirm = asyncio.Event()
    sent = w.publisher.send
    calls: list[list[str]] = []  # the placement windows given to the publisher

    async def slow_send(messages):  # type: ignore[no-untyped-def]
        if any(m.kind == "assign" for m in messages):
            calls.append([m.kind for m in messages])
            if len(calls) == 1:
                await confirm.wait()  # the first window's confirms take their time
        return await sent(messages)

    w.publisher.send = slow_send  # type: ignore[method-assign]
    loop_task = asyncio.create_task(w.placer.run_forever())
    try:
        await w.submit(request_payload(run_id="a1", connection_id="c1", mode="unattended"))
        w.placer.request("g:bots")  # what intake asks (the world's intake only records it)
        for _ in range(200):
            if (await w.run("a1")).status is RunStatus.dispatched and calls:
                break
            await asyncio.sleep(0.01)
        await w.submit(request_payload(run_id="a2", connection_id="c2", mode="unattended"))
        w.placer.request("g:bots")  # what intake asks (the world's intake only records it)
        for _ in range(200):
            if (await w.run("a2")).status is RunStatus.dispatched:
                break
            await asyncio.sleep(0.01)
        # a2 was claimed while a1's window was still unconfirmed; its window waits.
        assert (await w.run("a2")).status is RunStatus.dispatched
        assert len(calls) == 1 and not w.publisher.of_kind("assign")
        confirm.set()
        for _ in range(200):
            if len(calls) == 2 and len(w.publisher.of_kind("assign")) == 2:
                break
            await asyncio.sleep(0.01)
        assigned = [json.loads(m.body)["request"]["run_id"] for m in w.publisher.of_kind("assign")]
        assert assigned == ["a1", "a2"]
    finally:
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
