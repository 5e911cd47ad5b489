"""The minimal baseline's Lua scripts on the real Redis: the hand-off is fenced.

A benchmark that did not fence would measure less than the product must do; these check that
``ADMIT_CLAIM`` and ``START_FINISH`` keep the guarantees the README claims for them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bench.minimal.handoff import ADMIT_CLAIM, START_FINISH
from bench.minimal.names import MinimalNames, new_namespace, redis_url

pytestmark = pytest.mark.integration


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url(), decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def names(redis: aioredis.Redis) -> AsyncIterator[MinimalNames]:
    names = MinimalNames(new_namespace("minimaltest"))
    yield names
    keys = [k async for k in redis.scan_iter(match=names.pattern)]
    if keys:
        await redis.unlink(*keys)


async def admit(redis: aioredis.Redis, names: MinimalNames, *runs: tuple[str, str]) -> list[int]:
    argv: list[str] = [names.key(""), "100.0"]
    for run_id, machine in runs:
        argv += [run_id, machine, f'{{"run_id":"{run_id}"}}']
    return list(await redis.eval(ADMIT_CLAIM, 0, *argv))  # type: ignore[misc]


async def finish(
    redis: aioredis.Redis, names: MinimalNames, machine: str, *runs: tuple[str, int]
) -> list[int]:
    argv: list[str] = [names.key(""), "100.25", machine]
    for run_id, fence in runs:
        argv += [run_id, str(fence)]
    return list(await redis.eval(START_FINISH, 0, *argv))  # type: ignore[misc]


async def test_a_batch_gets_distinct_fences_and_a_request_seen_again_keeps_its_own(
    redis: aioredis.Redis, names: MinimalNames
) -> None:
    fences = await admit(redis, names, ("r1", "0"), ("r2", "1"), ("r3", "0"))
    assert len(set(fences)) == 3
    again = await admit(redis, names, ("r2", "1"), ("r4", "1"))
    assert again[0] == fences[1]
    assert again[1] not in fences
    assert await redis.hget(names.key("run:r1"), "req") == '{"run_id":"r1"}'
    assert await redis.hgetall(names.key("assigned:0")) == {
        "r1": str(fences[0]),
        "r3": str(fences[2]),
    }


async def test_only_the_current_fence_starts_a_run_and_only_once(
    redis: aioredis.Redis, names: MinimalNames
) -> None:
    (fence,) = await admit(redis, names, ("r1", "0"))
    assert await finish(redis, names, "0", ("r1", fence + 1)) == [0]  # stale fence
    assert await redis.hget(names.key("run:r1"), "st") == "d"
    assert await finish(redis, names, "0", ("r1", fence)) == [1]
    assert await finish(redis, names, "0", ("r1", fence)) == [0]  # a second delivery
    assert await redis.hget(names.key("run:r1"), "st") == "s"
    assert await redis.hlen(names.key("assigned:0")) == 0
    # The finished index holds the run's latency in ms (admitted at 100.0, done at 100.25).
    assert await redis.zscore(names.finished, "r1") == pytest.approx(250.0)


async def test_a_batch_reports_each_run(redis: aioredis.Redis, names: MinimalNames) -> None:
    f1, f2 = await admit(redis, names, ("r1", "0"), ("r2", "0"))
    assert await finish(redis, names, "0", ("r1", f1), ("r2", f1), ("r9", 1)) == [1, 0, 0]
    assert await redis.zcard(names.finished) == 1
    assert f2 != f1
