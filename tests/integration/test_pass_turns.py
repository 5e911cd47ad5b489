"""Replicas take turns to pass over a target (``PassTurns``): the rules on the real Redis and on
the fake, and the placer's loop with turns on the real Redis: a replica whose turn it is not
leaves word and places nothing, the replica passing is told to go again, and a turn whose
holder died lapses, so the run is still placed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from dispatcher.adapters.redis.connection import delete_namespace, make_redis
from dispatcher.adapters.redis.leases import RedisPassTurns
from dispatcher.models import RunStatus
from dispatcher.names import Names
from dispatcher.usecases.placement import PASS_TURN_S, PassTurns, Placer
from tests.support.builders import credentials, fleet, machine, request_payload
from tests.support.fakes import FakePassTurns
from tests.support.processes import new_settings
from tests.support.world import World

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

TARGET = "g:bots"
Turns = Callable[[str], PassTurns]


@asynccontextmanager
async def turns_of(kind: str) -> AsyncIterator[Turns]:
    """A factory of one replica's turns (by owner), all sharing one store."""
    if kind == "fake":
        shared: dict[Any, Any] = {}
        yield lambda owner: FakePassTurns(owner, time.monotonic, shared)
        return
    names = Names(new_settings().namespace)
    redis = make_redis(new_settings())
    try:
        yield lambda owner: RedisPassTurns(redis, names, owner)
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()


@pytest.mark.parametrize("kind", ["redis", "fake"])
async def test_one_replica_passes_at_a_time_and_goes_again_when_another_asked(kind: str) -> None:
    async with turns_of(kind) as turns:
        a, b = turns("replica-a"), turns("replica-b")
        assert await a.begin(TARGET, 5.0)
        assert await a.begin(TARGET, 5.0)  # its own turn: a pass after a pass
        assert await b.begin("g:other", 5.0)  # turns are per target
        assert not await b.begin(TARGET, 5.0)  # a's pass is under way: b leaves word
        assert not await b.end(TARGET, 5.0)  # not b's turn: nothing ends
        assert await a.end(TARGET, 5.0)  # b asked meanwhile: a keeps the turn, goes again
        assert not await b.begin(TARGET, 5.0)
        assert await a.begin(TARGET, 5.0)  # the pass b asked for (its word is taken)
        assert not await a.end(TARGET, 5.0)  # nobody asked during it: the turn is free
        assert await b.begin(TARGET, 5.0)
        assert not await b.end(TARGET, 5.0)
        # A turn whose holder stopped (never ended it) lapses.
        assert await a.begin(TARGET, 0.2)
        assert not await b.begin(TARGET, 5.0)
        await asyncio.sleep(0.3)
        assert await b.begin(TARGET, 5.0)
        assert not await a.end(TARGET, 5.0)  # a's turn lapsed: it ends nothing of b's
        assert not await b.end(TARGET, 5.0)  # b's word was taken by its own pass's begin


def world_with_turns(turns: PassTurns) -> tuple[World, Placer]:
    connections = (credentials("c1", group_id="bots"),)
    w = World(fleet(machines=(machine("m1", group_id="bots"),), groups=("bots",),
                    connections=connections))  # fmt: skip
    w.placer.turns = turns
    return w, w.placer


@asynccontextmanager
async def placing(placer: Placer) -> AsyncIterator[None]:
    task = asyncio.create_task(placer.run_forever())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for pending in placer._retry_handles.values():
            pending.cancel()


async def _status(w: World, run_id: str, status: RunStatus, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (await w.run(run_id)).status is status:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_replica_whose_turn_it_is_not_places_nothing_and_the_holder_is_told() -> None:
    async with turns_of("redis") as turns:
        other = turns("replica-a")
        w, placer = world_with_turns(turns("replica-b"))
        await w.heartbeat("m1")
        await w.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
        assert await other.begin(TARGET, 30.0)  # replica a's pass is under way
        async with placing(placer):
            placer.request(TARGET)
            assert not await _status(w, "r1", RunStatus.dispatched, 1.0)
            assert TARGET in placer._retry_handles  # asked again later, in case a dies
            assert await other.end(TARGET, 30.0)  # a is told to pass again...
            assert not await other.end(TARGET, 30.0)  # ...and frees the turn after that pass
            placer.request(TARGET)
            assert await _status(w, "r1", RunStatus.dispatched, 10.0)
        # b's pass ended its turn: the target is free for a.
        assert await other.begin(TARGET, 30.0)


async def test_a_turn_held_by_a_replica_that_died_lapses_and_the_run_is_placed() -> None:
    async with turns_of("redis") as turns:
        w, placer = world_with_turns(turns("replica-b"))
        await w.heartbeat("m1")
        await w.submit(request_payload(run_id="r1", connection_id="c1", mode="unattended"))
        assert await turns("replica-dead").begin(TARGET, PASS_TURN_S)  # never ended
        async with placing(placer):
            placer.request(TARGET)
            assert not await _status(w, "r1", RunStatus.dispatched, 0.5)
            assert await _status(w, "r1", RunStatus.dispatched, PASS_TURN_S + 5.0)
