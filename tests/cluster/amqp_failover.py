"""Follow a RabbitMQ cluster from one client: a robust connection that knows every node.

aio-pika's ``connect_robust`` takes one URL and reconnects to that URL only, so a client
connected to a node that dies keeps knocking on the dead node. ``ClusterConnection`` is given
every node's URL and moves to the next one each time its connection closes *or* a connection
attempt fails: aio-pika calls ``_on_connection_close`` in both cases (a failed attempt reports
its exception through the same callback), which makes it the one hook that sees every failure.
Everything else (channels reopened, queues re-declared, consumers restored) is aio-pika's own
robust recovery, unchanged.

The connection itself is the product's (``dispatcher/adapters/amqp/cluster.py``); the tests
here prove it against a real 3-node cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)

from dispatcher.adapters.amqp.cluster import ClusterConnection
from dispatcher.adapters.amqp.cluster import connect_cluster as product_connect_cluster


async def connect_cluster(
    urls: Sequence[str],
    *,
    start: int = 0,
    reconnect_interval: float = 1.0,
    **kwargs: Any,
) -> ClusterConnection:
    """The product's ``connect_cluster``, trying the nodes in order from ``urls[start]`` and
    with aio-pika's pause between attempts at 1 s: these tests study the broker's own
    behaviour at a node's death, not the product's longer pause (see its docstring)."""
    return await product_connect_cluster(
        [*urls[start:], *urls[:start]], reconnect_interval=reconnect_interval, **kwargs
    )


class ConfirmingPublisher:
    """Publish until the broker confirms, over a connection that may move between nodes.

    At least once: a retried publish whose first confirm was lost is a duplicate the consumer
    must absorb. Each attempt is bounded, since aio-pika raises or hangs while a robust
    connection reconnects (aio-pika #636, #508). After a nack the channel is replaced: on
    RabbitMQ 3.10.8 a channel whose first publish to a quorum queue lands while the queue has
    no leader (its leader's node just died) is nacked for that queue from then on, even once a
    new leader is elected, while a fresh channel is confirmed at once (see
    ``test_classic_queue_is_gone_with_its_node_quorum_queue_is_not``).
    """

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self._channel: AbstractChannel | None = None
        self.nacks = 0
        self.returns = 0
        self.failures = 0
        self.channels_opened = 0

    async def _current(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            self.channels_opened += 1
        return self._channel

    async def _replace_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), 2)

    async def publish(
        self,
        message: aio_pika.Message,
        routing_key: str,
        *,
        attempt_timeout: float = 5.0,
        deadline_s: float = 120.0,
    ) -> int:
        """Publish ``message`` to the default exchange until confirmed; return the attempts."""
        attempts = 0
        stop_at = time.monotonic() + deadline_s
        while True:
            attempts += 1
            try:
                channel = await asyncio.wait_for(self._current(), attempt_timeout)
                await asyncio.wait_for(
                    channel.default_exchange.publish(message, routing_key, mandatory=True),
                    attempt_timeout,
                )
                return attempts
            except PublishError:
                self.returns += 1  # unroutable: mandatory brought it back
            except DeliveryError:
                self.nacks += 1
                await self._replace_channel()
            except (*CONNECTION_EXCEPTIONS, ChannelInvalidStateError, TimeoutError, RuntimeError):
                self.failures += 1
            if time.monotonic() > stop_at:
                raise TimeoutError(f"not confirmed within {deadline_s:.0f} s")
            await asyncio.sleep(0.1)
