"""The queue order the store keeps, on the real Redis adapter and on the in-memory fake.

Runs are admitted in a shuffled order with few distinct enqueue times (so equal scores come
up) and both priorities; the target's queue, each lane and every run's position must follow
``order_score`` and then the run id. ``tests.support.builders.sort_key`` (the model the
scenario tests of the core use) is checked here against what the store answers.
"""

from __future__ import annotations

import random

import pytest

from dispatcher.core.ordering import lane_of, order_score
from dispatcher.models import Priority
from tests.integration.test_store_contract import HOUR, NOW, admission, open_store
from tests.support.builders import sort_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BOOST = HOUR  # the boost ``admission`` applies to high-priority runs


@pytest.mark.parametrize("kind", ["redis", "fake"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_the_queue_follows_score_then_run_id(kind: str, seed: int) -> None:
    rng = random.Random(seed)
    times = [NOW + rng.choice([0.0, 1.0, 2.5]) for _ in range(3)]
    runs = []
    for index in range(25):
        run_id = f"r{rng.randrange(1000):03d}-{index}"
        priority = rng.choice([Priority.normal, Priority.high])
        connection = rng.choice(["c1", "c2"])
        runs.append((run_id, priority, rng.choice(times), connection))
    expected = sorted(runs, key=lambda run: sort_key(order_score(run[1], run[2], BOOST), run[0]))
    async with open_store(kind) as store:
        for run_id, priority, at, connection in rng.sample(runs, len(runs)):
            admitted = admission(run_id, connection=connection, at=at, priority=priority.value)
            await store.transitions.admit(admitted)
        page = await store.reads.queue_page("g:bots", 0, -1)
        assert [run_id for run_id, _ in page] == [run[0] for run in expected]
        assert [score for _, score in page] == [
            order_score(run[1], run[2], BOOST) for run in expected
        ]
        lanes = await store.reads.lane_names("g:bots")
        members = await store.reads.lane_members("g:bots", lanes, len(runs))
        for lane, heads in members.items():
            in_lane = [
                run[0] for run in expected if lane_of(run[3], "unattended", run[1].value) == lane
            ]
            assert [head.run_id for head in heads] == in_lane
        for position, (run_id, *_rest) in enumerate(expected, start=1):
            record = await store.reads.get(run_id)
            assert record is not None and await store.reads.position(record) == position
