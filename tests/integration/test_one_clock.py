"""One clock decides deadlines: Redis's. A worker whose clock is 120 s behind starts a run;
its run deadline is Redis's time + the time limit + grace, so the dispatchers do not time it
out early (no false DesktopFlowsActionTimeout)."""

from __future__ import annotations

import time

import pytest

from dispatcher.adapters.redis.clock import StoreClock
from dispatcher.adapters.redis.connection import delete_namespace, make_redis
from dispatcher.adapters.redis.reads import RedisRunReads
from dispatcher.adapters.redis.transitions import RedisTransitions
from dispatcher.names import Names
from dispatcher.usecases.ports import Start
from dispatcher.usecases.results import Claimed, Started
from tests.integration.test_store_contract import admission, claim
from tests.support.processes import new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BEHIND_S = 120.0
LIMIT_S = 10.0
GRACE_S = 60.0


async def test_a_worker_clock_behind_does_not_shorten_the_run_deadline() -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    transitions = RedisTransitions(redis, names, settings.retention_s)
    reads = RedisRunReads(redis, names)
    clock = StoreClock(redis)
    try:
        assert abs(await clock.sync()) < 5  # same host: Redis's clock is this one
        now = clock()
        await transitions.admit(admission("r1", at=now, deadline=now + 3600))
        [claimed] = await transitions.claim_many([claim("r1", score=now)], now)
        assert isinstance(claimed, Claimed)
        worker_now = now - BEHIND_S  # the worker's clock
        begun = Start("r1", claimed.fence, worker_now + LIMIT_S + GRACE_S, "m1", "w1")
        [started] = await transitions.start_many([begun], worker_now)
        assert isinstance(started, Started)
        assert await reads.overdue_running(clock()) == []
        deadline = await redis.zscore(names.running_deadlines, "r1")
        assert deadline is not None
        assert abs(deadline - (now + LIMIT_S + GRACE_S)) < 5
        assert await reads.overdue_running(clock() + LIMIT_S + GRACE_S + 5) == ["r1"]
    finally:
        await delete_namespace(redis, names)
        await redis.aclose()


async def test_the_store_clock_follows_redis() -> None:
    settings = new_settings()
    redis = make_redis(settings)
    clock = StoreClock(redis)
    try:
        await clock.sync()
        seconds, micros = await redis.time()
        assert abs(clock() - (seconds + micros / 1e6)) < 1.0
        assert abs(clock() - time.time()) < 5
    finally:
        await redis.aclose()
