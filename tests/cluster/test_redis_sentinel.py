"""What the product can rely on (and must survive) with Redis Sentinel, proven with redis-py.

* redis-py's ``Sentinel`` client follows a failover: commands retried on a connection error
  reach the new primary, once its connections ask the Sentinels again on every reconnection
  (``redis_failover.FollowingSentinelConnection``; the stock class does not).
* Replication is asynchronous: writes the primary acknowledged and the replica had not received
  are gone after a failover, for good (the old primary drops them when it rejoins).
* Even a planned ``SENTINEL FAILOVER`` loses acknowledged writes: a pooled connection keeps
  writing to the old primary, which stays a primary until the Sentinels reconfigure it (up to
  ~10 s later). Two mitigations are measured: dropping the pool on Sentinel's
  ``+switch-master`` message, and ``min-replicas-to-write 1`` on the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from tests.cluster import redis_failover
from tests.cluster.conftest import record, redis_sentinel

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(90)]


@contextlib.asynccontextmanager
async def sentinel_client(group: Any, **kwargs: Any) -> AsyncIterator[aioredis.Redis]:
    """The client the product would build from its Sentinel settings (redis_failover)."""
    sentinel, client = redis_failover.sentinel_client(
        group.sentinel_addresses, group.service, decode_responses=True, **kwargs
    )
    try:
        yield client
    finally:
        await client.aclose()
        await sentinel.aclose()


def direct(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, decode_responses=True)


def present(port: int, numbers: list[int]) -> set[int]:
    """Which ``seq:<n>`` keys the server on ``port`` holds."""
    with direct(port) as server:
        pipe = server.pipeline(transaction=False)
        for n in numbers:
            pipe.exists(f"seq:{n}")
        return {n for n, found in zip(numbers, pipe.execute(), strict=True) if found}


class Writer:
    """Writes ``seq:<n>`` one after another, 5 ms apart, and keeps what Redis acknowledged.

    Every 50th write is followed by ``WAIT 1`` in the same pipeline (same connection): when it
    answers 1, every write so far is on the replica (``replicated_upto``)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.acked: list[tuple[int, float]] = []
        self.sent_at: dict[int, float] = {}  # when each write was sent (acked ones only)
        self.replicated_upto = -1
        self.refusals = 0  # NOREPLICAS answers
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop writing; raises whatever error reached the writer (retries did not absorb)."""
        assert self._task is not None
        self._stop.set()
        await self._task

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if n % 50 == 49:
                    pipe = self.client.pipeline(transaction=False)
                    pipe.set(f"seq:{n}", n)
                    pipe.wait(1, 200)
                    _, replicas = await pipe.execute()
                    if replicas >= 1:
                        self.replicated_upto = n
                else:
                    await self.client.set(f"seq:{n}", n)
                self.acked.append((n, time.monotonic()))
                self.sent_at[n] = sent
                n += 1
            except redis_errors.ResponseError as exc:
                if not str(exc).startswith("NOREPLICAS"):
                    raise
                # The primary refuses writes without a live replica: ask the Sentinels again.
                self.refusals += 1
                await self.client.connection_pool.disconnect()
            await asyncio.sleep(0.005)

    @property
    def numbers(self) -> list[int]:
        return [n for n, _ in self.acked]

    def longest_gap(self) -> float:
        times = [t for _, t in self.acked]
        return max(b - a for a, b in itertools.pairwise(times))

    async def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        """Wait until ``count`` more writes are acknowledged."""
        assert self._task is not None
        deadline = time.monotonic() + timeout_s
        target = len(self.acked) + count
        while len(self.acked) < target:
            if self._task.done():
                self._task.result()  # the error that stopped the writer
                raise AssertionError("the writer stopped")
            assert time.monotonic() < deadline, f"the writer did not write {count} more"
            await asyncio.sleep(0.02)


async def test_the_client_follows_a_crash_of_the_primary(sentinel_group: Any) -> None:
    group = sentinel_group
    async with sentinel_client(group) as client:
        writer = Writer(client)
        writer.start()
        await writer.wait_for(300)
        old = group.primary()
        group.kill(old)
        killed_at = time.monotonic()
        new, took = await asyncio.to_thread(group.wait_for_new_primary, old)
        await writer.wait_for(300)
        await writer.stop()  # raises if an error reached the writer: retries absorbed it

    assert new != old and group.role(new) == "master"
    kept = present(new.port, writer.numbers)
    confirmed = [n for n in writer.numbers if n <= writer.replicated_upto]
    assert confirmed and set(confirmed) <= kept  # what WAIT confirmed survived
    after = [n for n, at in writer.acked if at > killed_at + took]
    assert after and set(after) <= kept  # the client writes to the new primary
    record("redis crash failover: primary killed -> Sentinels agree on the replica", took)
    record("redis crash failover: longest pause of the writer", writer.longest_gap())
    record(
        "redis crash failover: acknowledged writes lost (replica in sync)",
        len(writer.numbers) - len(kept),
        "",
    )


async def test_writes_acknowledged_while_the_replica_lags_are_lost_at_failover(
    sentinel_group: Any,
) -> None:
    group = sentinel_group
    count = 200
    async with sentinel_client(group) as client:
        for n in range(count):
            await client.set(f"before:{n}", n)
        assert await client.wait(1, 2000) == 1  # the replica has all of them

        group.lag_replica()
        for n in range(count):
            assert await client.set(f"after:{n}", n)  # acknowledged by the primary...
        assert await client.wait(1, 300) == 0  # ...and by no replica

        old = group.primary()
        group.kill(old)
        new, took = await asyncio.to_thread(group.wait_for_new_primary, old)

        # The same client, following the Sentinels, now talks to the promoted replica.
        before = sum([await client.exists(f"before:{n}") for n in range(count)])
        after = sum([await client.exists(f"after:{n}") for n in range(count)])
        assert (before, after) == (count, 0)
        await client.set("written-after-failover", 1)
    assert direct(new.port).get("written-after-failover") == "1"

    # The old primary still has the writes in its AOF; when it comes back the Sentinels make
    # it a replica of the new primary, and the full resync drops them: lost for good.
    group.restart(old)
    rejoined = await asyncio.to_thread(group.wait_in_sync, 60.0)
    # wait_in_sync saw it linked to the new primary as its replica, holding all its writes. A
    # replica still, unless the Sentinels failed back to it since: it was found a master right
    # after once, in a loaded make test, most likely because the full resync kept the new
    # primary from answering them for down_after_ms (1 s). Its data is the new primary's
    # either way, which is what the lines below check.
    assert group.role(old) == "slave" or group.primary() == old
    with direct(old.port) as server:
        assert server.exists(*(f"after:{n}" for n in range(count))) == 0
        assert server.exists(*(f"before:{n}" for n in range(count))) == count
    record(
        "redis lagging replica: acknowledged writes lost at failover",
        f"{count - after}/{count}",
        "",
    )
    record("redis lagging replica: failover after the kill", took)
    record("redis lagging replica: old primary back as a replica in sync", rejoined)


async def test_a_stopped_replica_still_receives_writes_into_its_socket_buffers(
    sentinel_group: Any,
) -> None:
    """Why ``lag_replica`` cuts the link instead of SIGSTOPping the replica: a stopped
    replica's kernel keeps receiving the replication stream, and once it runs again it applies
    what arrived, so small writes made while it was stopped are not lost at failover."""
    group = sentinel_group
    count = 100
    async with sentinel_client(group) as client:
        await client.set("warm", 1)
        replica = group.replica()
        group.freeze(replica)
        try:
            for n in range(count):
                await client.set(f"frozen:{n}", n)
            assert await client.wait(1, 300) == 0  # the stopped replica acknowledged nothing
            old = group.primary()
            group.kill(old)
        finally:
            group.thaw(replica)
        new, _ = await asyncio.to_thread(group.wait_for_new_primary, old)
        assert new == replica
        kept = sum([await client.exists(f"frozen:{n}") for n in range(count)])
    assert kept == count
    record(
        "redis SIGSTOPped replica: writes made while stopped kept at failover",
        f"{kept}/{count}",
        "",
    )


async def wait_until_replica(group: Any, server: Any, timeout_s: float = 40.0) -> float:
    began = time.monotonic()
    while True:
        with contextlib.suppress(OSError, redis_sentinel.RespError):
            if group.role(server) == "slave":
                return time.monotonic() - began
        assert time.monotonic() - began < timeout_s, "the old primary was never demoted"
        await asyncio.sleep(0.1)


async def switch_master_watcher(group: Any, client: aioredis.Redis, fired: list[float]) -> None:
    """Drop every pooled connection when a Sentinel announces a new primary, so that no
    connection goes on writing to the old one."""
    sentinel = aioredis.Redis(host="127.0.0.1", port=group.sentinel_ports[0])
    pubsub = sentinel.pubsub()
    try:
        await pubsub.subscribe("+switch-master")
        async for message in pubsub.listen():
            if message["type"] == "message":
                await client.connection_pool.disconnect()
                fired.append(time.monotonic())
    finally:
        await pubsub.aclose()
        await sentinel.aclose()


@pytest.mark.parametrize("mitigation", ["none", "switch-master", "min-replicas-to-write"])
async def test_a_planned_failover_loses_writes_sent_to_the_old_primary(mitigation: str) -> None:
    config = ("min-replicas-to-write 1", "min-replicas-max-lag 1")
    group = redis_sentinel.RedisSentinelGroup(
        server_config=config if mitigation == "min-replicas-to-write" else ()
    )
    group.start()
    fired: list[float] = []
    try:
        async with sentinel_client(group) as client:
            writer = Writer(client)
            writer.start()
            watcher = None
            if mitigation == "switch-master":
                watcher = asyncio.create_task(switch_master_watcher(group, client, fired))
            await writer.wait_for(200)
            old = group.primary()
            began = time.monotonic()
            new, took = await asyncio.to_thread(group.failover)
            demoted = await wait_until_replica(group, old)
            demoted_at = time.monotonic()
            await writer.wait_for(100)
            await writer.stop()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher

        lost = sorted(set(writer.numbers) - present(new.port, writer.numbers))
        # In the end the client follows: the writes sent once the old primary was seen
        # demoted are on the new one. (Acked after it is not enough: a write sent before,
        # followed by WAIT, was acked up to 200 ms later and lost with the old primary.)
        last = [n for n in writer.numbers[-100:] if writer.sent_at[n] > demoted_at]
        assert len(last) >= 50
        assert set(last) <= present(new.port, last)
        if mitigation == "none":
            # The hazard: the old primary acknowledged writes after the replica's promotion.
            assert lost
        elif mitigation == "switch-master":
            assert fired
            later = [n for n, at in writer.acked if at > fired[0]]
            assert later and not set(later) & set(lost)
        else:
            # The old primary refuses writes as soon as it sees its replica's link close at the
            # promotion: only a write caught in that instant can be lost (0 or 1 here).
            acked_at = dict(writer.acked)
            assert all(began - 1 <= acked_at[n] <= began + took + 1 for n in lost), lost
            assert len(lost) <= 5 and writer.refusals > 0
    finally:
        group.stop()
    record(f"redis planned failover, mitigation {mitigation}: writes lost", len(lost), "")
    record(
        f"redis planned failover, mitigation {mitigation}: longest writer pause",
        writer.longest_gap(),
    )
    record(
        f"redis planned failover, mitigation {mitigation}: promoted / old primary demoted",
        f"{took:.2f} / {demoted:.2f}",
        "s",
    )


@pytest.mark.parametrize("connection", ["stock", "following"])
async def test_a_retried_command_asks_the_sentinels_for_the_new_primary(
    sentinel_group: Any, connection: str
) -> None:
    """The old primary is demoted under an open connection (as Sentinel does, minus the
    CLIENT KILL that usually hides the problem): the next write answers READONLY. redis-py's
    stock Sentinel connection retries against the same, demoted server until its retries are
    spent; the following connection asks the Sentinels and lands on the new primary."""
    group = sentinel_group
    async with sentinel_client(group, following=(connection == "following"), retries=3) as client:
        await client.set("before", 1)  # a pooled connection to the current primary
        old = group.primary()
        new, _ = await asyncio.to_thread(group.failover)
        with direct(old.port) as server:
            if server.info("replication")["role"] == "master":
                server.replicaof("127.0.0.1", new.port)  # demote it ourselves, right now
        if connection == "stock":
            with pytest.raises(redis_errors.ConnectionError, match="previous master"):
                await client.set("after", 1)
        else:
            assert await client.set("after", 1)
            assert direct(new.port).get("after") == "1"


async def test_the_sentinel_pool_waits_for_a_free_connection(sentinel_group: Any) -> None:
    """Like the product's single-Redis pool: more concurrent commands than connections wait
    for one instead of failing with "Too many connections"."""
    async with sentinel_client(sentinel_group, max_connections=2) as client:
        assert isinstance(client.connection_pool, redis_failover.SentinelBlockingConnectionPool)
        results = await asyncio.gather(*(client.blpop([f"nothing:{n}"], 0.2) for n in range(6)))
        assert results == [None] * 6
