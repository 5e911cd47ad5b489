"""RabbitMQ (the ``Broker`` port): one robust connection, confirmed publishing, consumers.

Publishing always waits for publisher confirms, but as a window (many publishes in flight,
confirms awaited together), never one by one. Messages to machine queues are ``mandatory``: a
message RabbitMQ cannot route raises instead of vanishing. The topology is declared by
:mod:`.topology`; what happens to a delivery is decided in :mod:`.consumer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPConnectionError, ChannelInvalidStateError, PublishError
from aio_pika.message import IncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity, DeliveryError

from dispatcher.adapters.amqp import lease, window
from dispatcher.adapters.amqp.cluster import connect_cluster, split_urls
from dispatcher.adapters.amqp.confirms import ConfirmWatch
from dispatcher.adapters.amqp.consumer import (
    ConsumerLoop,
    OutageHook,
    copy_to_dead_letters,
    held_copy,
)
from dispatcher.adapters.amqp.consumers import connection_name
from dispatcher.adapters.amqp.delivery import AmqpDelivery, LeanQueue, delivery_of
from dispatcher.adapters.amqp.machine_queues import declaring_channels
from dispatcher.adapters.amqp.topology import (
    DEAD_LETTER_MAX,
    channel_kept_if_done,
    declare_topology,
    look_up_topology,
)
from dispatcher.core.principals import admin_user_of
from dispatcher.errors import BrokerUnavailable
from dispatcher.names import Names
from dispatcher.usecases.ports import BatchHandler
from dispatcher.usecases.results import OutboxMessage

log = logging.getLogger(__name__)

# What "RabbitMQ cannot be reached" looks like from aio-pika and aiormq.
UNREACHABLE: tuple[type[BaseException], ...] = (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
)

# Opening a consumer's channel on a connection that was just cut raises RuntimeError
# ("... closed") from aiormq: the same outage.
CONSUME_UNREACHABLE: tuple[type[BaseException], ...] = (*UNREACHABLE, RuntimeError)


class Amqp(window.WindowPublishing):
    """One robust connection, a confirming publisher channel, and consumers."""

    def __init__(
        self,
        url: str,
        names: Names,
        prefetch: int = 200,
        *,
        hold_s: float | None = None,
        on_outage: OutageHook | None = None,
        declare: bool = True,
        machine_queue_type: str = "quorum",
        dead_letter_max: int = DEAD_LETTER_MAX,
        one_active: bool = False,
    ) -> None:
        """``declare``: declare the contract's topology at connection (the dispatcher, the
        tools); a machine's worker only looks it up (its identity may configure nothing).
        ``one_active``: the shared queues take one consumer at a time (``active_replicas``)."""
        self.url = url
        self.cluster = len(split_urls(url)) > 1
        self.declare = declare
        self.machine_queue_type = machine_queue_type
        self.dead_letter_max = dead_letter_max
        self.one_active = one_active
        self.names = names
        self.prefetch = prefetch
        self.hold_s = hold_s
        self.on_outage = on_outage
        self.connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._renewing = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._machine_queues: set[str] = set()
        self._declaring = declaring_channels()
        self._consumer_channels: list[AbstractChannel] = []
        # RabbitMQ checks that a message's user_id is the connection's user: receivers know
        # who sent it (core/principals.sender_of).
        self.user_id = admin_user_of(url)
        self._tasks: set[asyncio.Task[None]] = set()
        self._consumers: list[tuple[AbstractQueue, str, ConsumerLoop]] = []
        self.refusals = lease.Refusals()  # a lock of ours held elsewhere after a reconnection

    async def connect(self) -> None:
        """Connect, open the publisher channel, declare the contract's topology."""
        properties: dict[str, Any] = {"connection_name": connection_name(self.names.ns)}
        urls = split_urls(self.url)
        try:
            if self.cluster:  # follow it from node to node
                self.connection = await connect_cluster(urls, client_properties=properties)
            else:
                self.connection = await aio_pika.connect_robust(
                    urls[0], client_properties=properties
                )
            self.connection.close_callbacks.add(self.refusals.on_close)
            self.connection.reconnect_callbacks.add(self.refusals.on_reconnect)
            self._publisher = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            if self.declare:
                self._exchanges = await declare_topology(
                    self.connection,
                    self._publisher,
                    self.names,
                    cluster=self.cluster,
                    dead_letter_max=self.dead_letter_max,
                    one_active=self.one_active,
                )
            else:
                self._exchanges = await look_up_topology(self._publisher, self.names)
        except ChannelNotFoundEntity as exc:  # no dispatcher has declared the namespace yet
            raise BrokerUnavailable(
                f"the namespace's exchanges are not declared yet: {exc}"
            ) from exc
        except UNREACHABLE as exc:
            raise BrokerUnavailable(f"RabbitMQ is unavailable: {exc}") from exc
        if self._watch is None:
            watch = ConfirmWatch(lambda: self._publisher, self._renew_publisher)
            self._watch = asyncio.create_task(watch.run(), name="confirm-watch")

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.connection = None

    @property
    def publisher(self) -> AbstractChannel:
        if self._publisher is None:
            raise RuntimeError("not connected")
        return self._publisher

    async def _underlay(self) -> Any:
        return await self.publisher.get_underlay_channel()

    def exchange(self, role: str) -> AbstractExchange:
        return self._exchanges[role]

    async def _publish_one(self, message: OutboxMessage) -> None:
        """Publish with a confirm. Assignments are ``mandatory``: a returned one means the
        machine's queue is missing, so it is declared and the message published again. Events
        are not: a status nobody subscribes to is normal, and having RabbitMQ return two
        events of every run costs both sides CPU for nothing (measured in bench/README.md)."""
        role = "events" if message.kind == "event" else "machines"
        try:
            await self._publish(role, message.routing_key, message.body, message.kind, message.id)
        except PublishError:  # basic.return: RabbitMQ could not route the assignment
            self._machine_queues.discard(message.routing_key)
            await self.ensure_machine_queue(message.routing_key)
            await self._publish(
                role, message.routing_key, message.body, message.kind, message.id, mandatory=True
            )

    async def _publish(
        self,
        role: str,
        routing_key: str,
        body: bytes,
        kind: str,
        message_id: str | None = None,
        *,
        mandatory: bool | None = None,
    ) -> None:
        """One JSON message (persistent unless its kind is a reply), confirmed; a returned
        one raises PublishError.

        The hot path of every run (five publishes each): straight to the channel under the
        robust channel, with the properties built here, and no wait for the frame to reach
        the socket before waiting for the confirm (``Exchange.publish`` holds the channel's
        lock until the socket is drained, one publish at a time; ~15 % of the CPU of a
        publish, see bench/README.md).
        """
        exchange = self.exchange(role)
        properties = window.json_properties(kind, message_id, self.user_id)
        publisher = self.publisher
        channel = cast(aiormq.Channel, await publisher.get_underlay_channel())
        try:
            await channel.basic_publish(
                body,
                exchange=exchange.name,
                routing_key=routing_key,
                properties=properties,
                mandatory=role != "events" if mandatory is None else mandatory,
                wait=False,
            )
        except PublishError:
            raise  # returned: the caller decides (a machine's queue to declare again)
        except DeliveryError as exc:  # nacked (see .confirms)
            raise await self._nacked(publisher, exc) from exc

    async def _renew_publisher(self, stuck: AbstractChannel) -> None:
        """Replace a publisher channel that RabbitMQ nacks or leaves unconfirmed (why: see
        :mod:`.confirms`)."""
        async with self._renewing:
            if self._publisher is not stuck or self.connection is None:
                return  # renewed already, by another publish that failed with it
            log.warning("publisher channel nacks or does not confirm: opening a new one")
            self._publisher = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            with contextlib.suppress(Exception):
                await stuck.close()

    async def publish_json(
        self, role: str, routing_key: str, body: bytes, *, kind: str, mandatory: bool = True
    ) -> None:
        """Publish one JSON message to an exchange of the contract (see ``_publish``)."""
        try:
            await self._publish(role, routing_key, body, kind, mandatory=mandatory)
        except UNREACHABLE as exc:
            raise BrokerUnavailable(f"RabbitMQ is unavailable: {exc}") from exc

    async def consume(
        self,
        queue: str,
        handler: BatchHandler,
        *,
        batch_size: int,
        prefetch: int | None = None,
        arguments: dict[str, Any] | None = None,
        gather_s: float = 0.0,
    ) -> asyncio.Task[None]:
        """Consume ``queue`` in batches; the consumer module acts on the handler's verdicts.

        ``BrokerUnavailable`` if the connection breaks meanwhile: nothing consumes then (the
        channel is closed), and the caller may try again once the robust connection is back.
        """
        if self.connection is None:
            raise RuntimeError("not connected")
        inbox: asyncio.Queue[AmqpDelivery] = asyncio.Queue()

        async def receive(message: aiormq.abc.DeliveredMessage | IncomingMessage) -> None:
            inbox.put_nowait(delivery_of(message))  # unbounded: the prefetch bounds it

        try:
            async with channel_kept_if_done(self.connection, publisher_confirms=False) as channel:
                await channel.set_qos(prefetch_count=prefetch or self.prefetch)
                # Deliveries as aiormq parsed them, not aio-pika's IncomingMessage (delivery.py).
                channel.QUEUE_CLASS = LeanQueue
                # Declared (passively), not just looked up: a robust channel re-creates only the
                # consumers of queues it declared, so ``get_queue(ensure=False)`` would leave
                # this consumer dead after a reconnection.
                declared = await channel.declare_queue(queue, passive=True)
                tag = await declared.consume(receive, no_ack=False, arguments=arguments)  # type: ignore[arg-type]
        except ChannelNotFoundEntity as exc:  # a machine's queues: declared at its heartbeat
            raise BrokerUnavailable(f"queue {queue} does not exist yet") from exc
        except CONSUME_UNREACHABLE as exc:
            raise BrokerUnavailable(f"RabbitMQ is unavailable: {exc}") from exc
        self._consumer_channels.append(channel)
        self._watch_cancel(channel, queue)

        async def republish(message: AmqpDelivery) -> None:
            await self.publisher.default_exchange.publish(
                held_copy(message, self.user_id), routing_key=queue, mandatory=True
            )

        loop = ConsumerLoop(
            inbox,
            handler,
            batch_size,
            self._dead_letter,
            hold_s=self.hold_s,
            republish=republish,
            gather_s=gather_s,
            **({"on_outage": self.on_outage} if self.on_outage else {}),
        )
        loop.task = asyncio.create_task(loop.run(), name=f"consume:{queue}")
        self._consumers.append((declared, tag, loop))
        return loop.task

    async def hold_exclusive_queue(self, queue: str) -> None:
        """Hold ``queue`` as a lock of this connection (``lease.hold``): ``InExclusiveUse``
        if another holds it; after a reconnection, ``exclusive_refused_for`` counts for how
        long another connection has held it since."""
        if self.connection is None:
            raise RuntimeError("not connected")
        channel = await lease.hold(self.connection, queue, self.user_id, CONSUME_UNREACHABLE)
        self._consumer_channels.append(channel)

    def is_connected(self) -> bool:
        """Whether the connection to RabbitMQ is up right now (readiness)."""
        connection = self.connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    def exclusive_refused_for(self) -> float:
        """For how long (seconds) reconnecting has failed because another connection holds a
        lock of ours (``hold_exclusive_queue``); 0 while not."""
        return self.refusals.refused_for()

    def consuming(self) -> bool:
        """Whether every consumer started here still runs (readiness)."""
        return all(loop.task is not None and not loop.task.done() for _, _, loop in self._consumers)

    async def stop_consuming(self, timeout_s: float, queues: Sequence[str] | None = None) -> bool:
        """Drain: cancel every consumer (of ``queues`` only, when given: a worker keeps its
        replies while it drains) (RabbitMQ sends nothing more), finish the deliveries already
        received, within ``timeout_s``. False when that took longer: what is left is handed
        back when the channels close (redelivered, deduplicated)."""
        consumers = [c for c in self._consumers if queues is None or c[0].name in queues]
        self._consumers = [c for c in self._consumers if c not in consumers]
        try:
            async with asyncio.timeout(timeout_s):
                for queue, tag, _loop in consumers:
                    with contextlib.suppress(*UNREACHABLE):
                        await queue.cancel(tag)
                await asyncio.gather(*(loop.drain() for _, _, loop in consumers))
        except TimeoutError:
            for _, _, loop in consumers:
                if loop.task is not None:
                    loop.task.cancel()
            return False
        return True

    async def _dead_letter(self, message: AmqpDelivery, reason: str) -> None:
        await copy_to_dead_letters(self.exchange("dead"), message, reason)
