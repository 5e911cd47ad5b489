"""What the product can rely on from a 3-node RabbitMQ 3.10 cluster, proven with raw aio-pika.

* A quorum queue keeps every confirmed message when its leader node dies or stops; a consumer
  and a publisher that know every node's URL follow the cluster to a live node and carry on.
* A classic queue lives on one node: while that node is down the queue cannot be declared,
  consumed or published to (a mandatory publish comes back), which is why every queue the
  product cannot lose must be a quorum queue in a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity, DeliveryError, PublishError

from dispatcher.adapters.amqp.cluster import split_urls
from tests.cluster.amqp_failover import ConfirmingPublisher, connect_cluster
from tests.cluster.conftest import record

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


@contextlib.asynccontextmanager
async def connection_to(url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connection = await aio_pika.connect(url)
    try:
        yield connection
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def eventually(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        await asyncio.sleep(0.05)


def test_three_nodes_form_one_cluster_apart_from_the_host_broker(cluster: Any) -> None:
    names = sorted(cluster.names)
    assert len(names) == 3
    for name in names:
        # Every node runs the management API and sees the same three running nodes.
        assert cluster.running_nodes(via=name) == names
    assert all(not name.startswith("rabbit@") for name in names)
    # Its own Erlang cookie and port mapper: the host's node cannot be reached from here.
    assert cluster.epmd_port != 4369
    host_cookie = Path("/var/lib/rabbitmq/.erlang.cookie")
    own_cookie = (cluster.dir / "home" / ".erlang.cookie").read_text()
    with contextlib.suppress(PermissionError, FileNotFoundError):
        assert host_cookie.read_text() != own_cookie
    assert "rdc1@localhost" in cluster.rabbitmqctl("cluster_status", node=names[0])


async def test_cluster_connection_skips_nodes_that_do_not_answer(cluster: Any) -> None:
    dead = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1
    assert split_urls(f" {dead} , {cluster.urls[1]} ") == [dead, cluster.urls[1]]
    connection = await connect_cluster([dead, cluster.urls[1]], timeout=2)
    try:
        assert connection.url.port == cluster.node(cluster.names[1]).amqp_port
        channel = await connection.channel()
        await channel.close()
    finally:
        await connection.close()
    with pytest.raises(ConnectionError):
        await connect_cluster([dead], timeout=2)


@pytest.mark.parametrize("how", ["kill", "graceful"])
async def test_quorum_queue_loses_nothing_when_its_leader_node_goes(
    cluster: Any, queue_name: str, how: str
) -> None:
    """Publish 1,500 confirmed messages while the node leading the queue is SIGKILLed (a crash)
    or stopped gracefully (a rolling restart). The publisher and the consumer are connected to
    that very node, so both must move: every confirmed message is consumed; duplicates (a
    confirm or an ack lost with the node) are counted, never a loss."""
    total, window = 1500, 50
    async with connection_to(cluster.urls[0]) as admin:
        channel = await admin.channel()
        await channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
    leader = cluster.leader_of(queue_name)
    leader_port = cluster.node(leader).amqp_port
    start = cluster.names.index(leader)

    consumer_connection = await connect_cluster(cluster.urls, start=start)
    publisher_connection = await connect_cluster(cluster.urls, start=start)
    assert consumer_connection.url.port == publisher_connection.url.port == leader_port
    received: list[tuple[int, float, int | None]] = []

    async def on_message(message: AbstractIncomingMessage) -> None:
        received.append((int(message.body), time.monotonic(), consumer_connection.url.port))
        with contextlib.suppress(Exception):  # the ack may die with the node: a redelivery
            await message.ack()

    try:
        consume_channel = await consumer_connection.channel()
        await consume_channel.set_qos(prefetch_count=100)
        queue = await consume_channel.declare_queue(queue_name, durable=True, arguments=QUORUM)
        await queue.consume(on_message)
        publisher = ConfirmingPublisher(publisher_connection)

        latencies: list[float] = []
        attempts: list[int] = []

        async def publish(number: int) -> None:
            began = time.monotonic()
            message = aio_pika.Message(
                str(number).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            tries = await publisher.publish(message, queue_name)
            latencies.append(time.monotonic() - began)
            attempts.append(tries)

        stopper: asyncio.Task[float] | None = None
        stopped_at = 0.0
        for first in range(0, total, window):
            await asyncio.gather(*(publish(n) for n in range(first, first + window)))
            if stopper is None and first >= total // 3:
                stopped_at = time.monotonic()
                stopper = asyncio.create_task(
                    asyncio.to_thread(cluster.stop_node, leader, kill=(how == "kill"))
                )
        assert stopper is not None
        await stopper

        wanted = set(range(total))
        await eventually(
            lambda: wanted <= {n for n, _, _ in received}, 60, "every confirmed message consumed"
        )
    finally:
        for connection in (consumer_connection, publisher_connection):
            with contextlib.suppress(Exception):
                await connection.close()

    numbers = [n for n, _, _ in received]
    duplicates = len(numbers) - len(set(numbers))
    new_leader = cluster.leader_of(queue_name)
    async with connection_to(cluster.node(new_leader).amqp_url) as admin:
        await (await admin.channel()).queue_delete(queue_name)
    after = [(at, port) for _, at, port in received if at > stopped_at]

    assert set(numbers) == wanted  # nothing lost, nothing unknown
    assert new_leader != leader
    assert consumer_connection.moves >= 1 and publisher_connection.moves >= 1
    assert after and all(port != leader_port for _, port in after[-10:])  # consumed elsewhere
    # Publishing went on across the node's death: some publishes failed and were confirmed
    # on a retry through another node.
    assert len(latencies) == total and any(tries > 1 for tries in attempts)

    record(f"rabbitmq quorum leader {how}: max publish-to-confirm", max(latencies))
    record(f"rabbitmq quorum leader {how}: publishes retried", sum(a > 1 for a in attempts), "")
    record(f"rabbitmq quorum leader {how}: duplicate deliveries", duplicates, "")
    times = sorted(at for _, at, _ in received)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    record(f"rabbitmq quorum leader {how}: longest consumer gap", max(gaps))


async def test_classic_queue_is_gone_with_its_node_quorum_queue_is_not(
    cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Declare a classic and a quorum queue on one node, fill both, kill that node. A client
    that consumed another classic queue of that node, through that node, cannot recover its
    connection until the node is back: aio-pika re-declares the queue on reconnection and the
    broker answers NOT_FOUND."""
    caplog.set_level(logging.WARNING, logger="aio_pika")
    suffix = f"{time.monotonic_ns()}"
    classic, quorum = f"clustertest.classic.{suffix}", f"clustertest.quorum.{suffix}"
    watched = f"clustertest.watched.{suffix}"
    home = cluster.names[1]
    count = 20
    async with connection_to(cluster.node(home).amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(classic, durable=True)
        await channel.declare_queue(quorum, durable=True, arguments=QUORUM)
        for n in range(count):
            for name in (classic, quorum):
                await channel.default_exchange.publish(
                    aio_pika.Message(str(n).encode(), delivery_mode=2), name, mandatory=True
                )
    assert cluster.leader_of(classic) == cluster.leader_of(quorum) == home
    follower = await connect_cluster(cluster.urls, start=cluster.names.index(home))
    watched_bodies: list[bytes] = []

    async def on_watched(message: AbstractIncomingMessage) -> None:
        watched_bodies.append(message.body)
        await message.ack()

    watched_queue = await (await follower.channel()).declare_queue(watched, durable=True)
    await watched_queue.consume(on_watched)

    cluster.stop_node(home, kill=True)
    survivor = cluster.node(cluster.names[2]).amqp_url
    async with connection_to(survivor) as connection:
        # The classic queue: cannot be declared (not even passively) nor published to.
        for passive in (True, False):
            channel = await connection.channel()
            with pytest.raises(ChannelNotFoundEntity, match="down or inaccessible"):
                await channel.declare_queue(classic, durable=True, passive=passive)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        with pytest.raises(PublishError, match="NO_ROUTE"):
            await channel.default_exchange.publish(
                aio_pika.Message(b"during", delivery_mode=2), classic, mandatory=True
            )
        # The quorum queue: a new leader takes it over with every message, and publishing
        # goes on. A channel whose first publish lands before the new leader is elected is
        # nacked; the publisher replaces it (see ConfirmingPublisher) and is confirmed.
        early = await connection.channel(publisher_confirms=True, on_return_raises=True)
        early_nacked = await nacked(early, quorum)
        publisher = ConfirmingPublisher(connection)
        await publisher.publish(aio_pika.Message(b"during", delivery_mode=2), quorum)
        still_nacked = early_nacked and await nacked(early, quorum)
        consumer = await connection.channel()
        queue = await consumer.declare_queue(quorum, durable=True, arguments=QUORUM)
        bodies = []
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.body != b"probe":  # a probe taken before it expired
                    bodies.append(message.body)
                if len(bodies) == count + 1:
                    break
        assert bodies == [str(n).encode() for n in range(count)] + [b"during"]
    record("rabbitmq: quorum publishes nacked during re-election", publisher.nacks, "")
    record(
        "rabbitmq: channel first used during the election, nacked / still nacked after it",
        f"{early_nacked} / {still_nacked}",
        "",
    )

    # Meanwhile the follower moved to live nodes, but every reconnection failed on the
    # watched classic queue; so would a consumer of the product's classic queues.
    refused = f"NOT_FOUND - home node '{home}' of durable queue '{watched}'"
    await eventually(
        lambda: any(refused in logged(r) for r in caplog.records),
        20,
        "a reconnection refused for the classic queue",
    )
    assert not follower.connected.is_set() or follower.url.port != cluster.node(home).amqp_port

    cluster.start_node(home)
    async with connection_to(survivor) as connection:
        channel = await connection.channel(publisher_confirms=True)
        back = await channel.declare_queue(classic, durable=True, passive=True)
        # The classic queue's persistent messages come back with its node; nothing else.
        assert back.declaration_result.message_count == count
        # With the node back, the follower's connection and its consumer are restored.
        await channel.default_exchange.publish(aio_pika.Message(b"back"), watched)
        await eventually(lambda: watched_bodies == [b"back"], 30, "the consumer restored")
        for name in (classic, quorum, watched):
            await channel.queue_delete(name)
    await follower.close()


def logged(record: logging.LogRecord) -> str:
    """A log record's text (aio-pika logs some objects whose repr raises)."""
    try:
        return record.getMessage()
    except Exception:
        return str(record.msg)


async def nacked(channel: aio_pika.abc.AbstractChannel, queue: str) -> bool:
    """Whether a publish of a marker to ``queue`` is refused (the marker is not kept)."""
    try:
        await channel.default_exchange.publish(
            aio_pika.Message(b"probe", delivery_mode=2, expiration=0.001), queue, mandatory=True
        )
    except DeliveryError:
        return True
    return False


async def test_quorum_queue_honours_message_ttl_on_3_10(cluster: Any, queue_name: str) -> None:
    """The product's hint queues (heartbeats, signals) are classic for their per-message TTL;
    3.10 quorum queues take ``x-message-ttl`` too, so they can be quorum in a cluster."""
    async with connection_to(cluster.urls[0]) as connection:
        channel = await connection.channel()
        ttl = {**QUORUM, "x-message-ttl": 300}
        expiring = await channel.declare_queue(queue_name, durable=True, arguments=ttl)
        keeping = await channel.declare_queue(f"{queue_name}.keep", durable=True, arguments=QUORUM)
        for queue in (expiring, keeping):
            await channel.default_exchange.publish(aio_pika.Message(b"hint"), queue.name)
        await asyncio.sleep(1.0)
        assert await expiring.get(fail=False) is None
        kept = await keeping.get(fail=False)
        assert kept is not None and kept.body == b"hint"
        await kept.ack()
        for queue in (expiring, keeping):
            await queue.delete(if_unused=False, if_empty=False)


@pytest.mark.parametrize("locator", ["client-local", "balanced"])
async def test_where_quorum_queue_leaders_go(cluster: Any, locator: str) -> None:
    """Queues declared through one connection (as one dispatcher declares every machine's
    queue) all get their leader on that connection's node by default (``client-local``);
    ``x-queue-leader-locator: balanced`` spreads them over the nodes that lead the fewest."""
    names = [f"clustertest.leaders.{locator}.{time.monotonic_ns()}.{n}" for n in range(6)]
    arguments = {**QUORUM, "x-queue-leader-locator": locator}
    async with connection_to(cluster.urls[0]) as connection:
        channel = await connection.channel()
        for name in names:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        leaders = [cluster.leader_of(name) for name in names]
        for name in names:
            await channel.queue_delete(name)
    if locator == "client-local":
        assert set(leaders) == {cluster.names[0]}
    else:
        # Balanced picks the nodes leading the fewest queues (those of earlier tests count).
        assert len(set(leaders)) >= 2
    record(
        f"rabbitmq: leaders of 6 queues declared on one node, {locator}", len(set(leaders)), "nodes"
    )
