"""Following a RabbitMQ cluster: a robust connection that knows every node.

``RUNDISPATCH_AMQP_URL`` may list several nodes, comma-separated. aio-pika's
``connect_robust`` takes one URL and reconnects to that URL only, so a client connected to a
node that dies keeps knocking on the dead node. :class:`ClusterConnection` is given every
node's URL and moves to the next one each time its connection closes *or* a connection attempt
fails (aio-pika reports both through ``_on_connection_close``). Everything else (channels
reopened, queues re-declared, consumers restored) is aio-pika's own robust recovery. Proven
against a real 3-node cluster in ``tests/cluster``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from aio_pika.robust_connection import RobustConnection
from yarl import URL


def split_urls(setting: str) -> list[str]:
    """``amqp://a:5672/,amqp://b:5672/`` as a list; a single URL is a list of one."""
    urls = [part.strip() for part in setting.split(",") if part.strip()]
    if not urls:
        raise ValueError("no AMQP URL given")
    return urls


class ClusterConnection(RobustConnection):
    """A robust connection over several nodes: on every close or failed attempt, the next
    reconnection goes to the next node's URL (round robin)."""

    def __init__(
        self,
        url: URL,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        urls: Sequence[URL] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(url, loop=loop, **kwargs)
        self.urls = list(urls) or [URL(url)]
        self._next = 1 % len(self.urls)
        self.moves = 0  # how many times the connection moved to another node

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called and len(self.urls) > 1:
            self.url = self.urls[self._next]
            self._next = (self._next + 1) % len(self.urls)
            self.moves += 1
        await super()._on_connection_close(closing)


async def connect_cluster(
    urls: Sequence[str],
    *,
    reconnect_interval: float = 5.0,
    timeout: float = 5.0,
    **kwargs: Any,
) -> ClusterConnection:
    """Connect to the first node that answers, in order; the connection then follows the
    cluster. ``reconnect_interval``: the pause before each reconnection. It is longer than a
    quorum queue's leader election: consumers and publishers restored on a queue that has
    no leader yet (its leader's node just died) were seen to stay silent (no deliveries,
    publishes nacked) on RabbitMQ 3.10; with 1 s the product-on-cluster test lost its
    consumers under load, with 5 s it passes. Raises the last error if no node answers.
    Keyword arguments (``client_properties`` ...) go to every node's connection alike."""
    parsed = [
        aio_pika.connection.make_url(url, reconnect_interval=reconnect_interval, **kwargs)
        for url in urls
    ]
    last: BaseException | None = None
    for first in range(len(parsed)):
        rotation = [*parsed[first:], *parsed[:first]]
        connection = ClusterConnection(rotation[0], urls=rotation)
        try:
            await connection.connect(timeout=timeout)
            return connection
        except CONNECTION_EXCEPTIONS as exc:
            last = exc
            with contextlib.suppress(Exception):
                await connection.close()
    assert last is not None
    raise last


async def connect_any(urls: Sequence[str]) -> aio_pika.abc.AbstractConnection:
    """A plain (not robust) connection to the first node that answers (tools, clean-up)."""
    last: BaseException | None = None
    for url in urls:
        try:
            return await aio_pika.connect(url)
        except CONNECTION_EXCEPTIONS as exc:
            last = exc
    assert last is not None
    raise last
