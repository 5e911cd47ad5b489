"""The product on Redis behind Sentinel (``RUNDISPATCH_REDIS_SENTINELS``): a dispatcher and two
workers carry a load while the replica is cut off (it lags: every write from then on would be
lost at a failover) and the primary is SIGKILLed, so that the Sentinels promote the replica.

The deployment the product supports sets ``min-replicas-to-write 1`` (see
``deploy/redis/redis.conf``'s notes): with the replica cut off the primary answers
``NOREPLICAS``, which the product treats as an outage and holds its work through, so no
acknowledged write is lost at the failover. Afterwards every run is terminal and none ran
twice. RabbitMQ is the shared one (a namespace of its own)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import pytest

from dispatcher.client import Client
from dispatcher.models import RunStatus
from dispatcher.settings import Settings
from tests.chaos.test_chaos import drain
from tests.cluster.conftest import record, redis_sentinel
from tests.cluster.test_product_on_cluster import MACHINES, fleet, submit_all
from tests.support.processes import Processes, new_settings

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.timeout(420),
]

RUNS = 300


@pytest.fixture
def settings(sentinel_group: Any) -> Settings:
    for server in sentinel_group.servers:
        for name, value in (("min-replicas-to-write", "1"), ("min-replicas-max-lag", "2")):
            redis_sentinel.command(server.port, "CONFIG", "SET", name, value)
    sentinels = ",".join(f"{host}:{port}" for host, port in sentinel_group.sentinel_addresses)
    return new_settings(
        redis_sentinels=sentinels,
        redis_sentinel_service=sentinel_group.service,
        throttle_per_minute=10_000_000,
        heartbeat_interval_s=0.5,
        offline_after_s=30.0,
        running_grace_s=10.0,
        outbox_relay_after_s=2.0,
        outage_hold_s=5.0,
    )


async def test_no_run_twice_and_every_run_terminal_across_a_failover_with_lag(
    sentinel_group: Any,
    client: Client,
    settings: Settings,
    procs: Processes,
    apply_fleet: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    apply_fleet(fleet())
    procs.dispatcher("d1")
    for machine in MACHINES:
        procs.worker(machine)
    run_ids = [f"se-{i:04d}-{uuid.uuid4().hex[:6]}" for i in range(RUNS)]
    stats: Counter[str] = Counter()
    submitting = asyncio.create_task(submit_all(client, run_ids, stats))
    await asyncio.sleep(3.0)
    await asyncio.to_thread(sentinel_group.wait_in_sync)
    old = sentinel_group.primary()
    await asyncio.to_thread(sentinel_group.lag_replica)
    await asyncio.sleep(1.5)
    sentinel_group.kill(old)
    _, took = await asyncio.to_thread(sentinel_group.wait_for_new_primary, old)
    record("product on sentinel: failover after SIGKILL of the primary", took)
    await asyncio.to_thread(sentinel_group.resume_replica)
    await asyncio.to_thread(sentinel_group.restart, old)
    await submitting
    records = await drain(client, run_ids, 60.0)
    executions = Counter(e["run_id"] for e in procs.executions())
    lost = [
        r for r, rec in zip(run_ids, records, strict=True) if rec is None or not rec.status.terminal
    ]
    twice = [r for r, n in executions.items() if n > 1]
    not_succeeded = Counter(
        (rec.status.value, rec.error.code.value if rec.error else None)
        for rec in records
        if rec is not None and rec.status.terminal and rec.status is not RunStatus.succeeded
    )
    with capsys.disabled():
        print(
            f"\nproduct on sentinel: runs {RUNS}, not terminal {len(lost)}, twice {len(twice)}, "
            f"not succeeded {dict(not_succeeded)}, publish {dict(stats)}",
            flush=True,
        )
    record("product on sentinel: runs not terminal / run twice", f"{len(lost)} / {len(twice)}", "")
    assert not twice, twice[:10]
    assert not lost, lost[:10]
