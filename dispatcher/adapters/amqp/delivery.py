"""What a consumer receives: aiormq's parsed frames, read where they are used.

aio-pika hands a consumer each delivery as an ``IncomingMessage`` (fifteen properties copied
one by one, each through a lock check) in a task of its own. At 10,000 live machines a replica
receives 2,000 heartbeats a second, and that wrapping was about a sixth of its CPU
(bench/README.md, "Live fleet at 10,000 machines"). Here the consumer gets aiormq's
``DeliveredMessage`` itself, wrapped in an :class:`AmqpDelivery` that reads a property only when
asked. The queue stays aio-pika's robust queue (:class:`LeanQueue`): after a reconnection its
consumer is restored like any other.

One restore does not come back through :class:`LeanQueue`: when RabbitMQ cancels a consumer
(its queue was deleted), aio-pika's robust channel consumes again with its own
``Queue.consume``, which hands the callback an ``IncomingMessage``. :func:`delivery_of` takes
either, so such a consumer keeps working (at aio-pika's cost) until the next reconnection.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any

from aio_pika.abc import ConsumerTag
from aio_pika.message import IncomingMessage
from aio_pika.robust_queue import RobustQueue
from aiormq.abc import DeliveredMessage

Receiver = Callable[[DeliveredMessage | IncomingMessage], Coroutine[Any, Any, None]]


class AmqpDelivery:
    """One delivery: its body and properties (the ``Delivery`` port) and how to settle it."""

    __slots__ = ("_message",)

    def __init__(self, message: DeliveredMessage) -> None:
        self._message = message

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def content_type(self) -> str | None:
        return self._message.header.properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self._message.header.properties.content_encoding

    @property
    def headers(self) -> Mapping[str, Any] | None:
        return self._message.header.properties.headers

    @property
    def message_id(self) -> str | None:
        return self._message.header.properties.message_id

    @property
    def timestamp(self) -> datetime | None:
        return self._message.header.properties.timestamp

    @property
    def type(self) -> str | None:
        return self._message.header.properties.message_type

    @property
    def user_id(self) -> str | None:
        """The publisher's broker user, validated by RabbitMQ (None when it set none)."""
        return self._message.header.properties.user_id

    @property
    def routing_key(self) -> str | None:
        return self._message.routing_key

    async def ack(self, multiple: bool = False) -> None:
        """Ack this delivery (and, with ``multiple``, every earlier one of its channel)."""
        await self._message.channel.basic_ack(self._tag(), multiple=multiple)

    async def nack(self, requeue: bool = True) -> None:
        await self._message.channel.basic_nack(self._tag(), requeue=requeue)

    def _tag(self) -> int:
        tag = self._message.delivery_tag
        if tag is None:  # only a delivery consumed without acks has none; ours all have one
            raise RuntimeError("a delivery without a delivery tag cannot be settled")
        return tag


class RestoredDelivery(AmqpDelivery):
    """A delivery aio-pika wrapped itself: a consumer it restored after RabbitMQ cancelled it
    (see the module's docstring) gets these until the next reconnection."""

    __slots__ = ("_incoming",)

    def __init__(self, message: IncomingMessage) -> None:
        self._incoming = message

    @property
    def body(self) -> bytes:
        return self._incoming.body

    @property
    def content_type(self) -> str | None:
        return self._incoming.content_type

    @property
    def content_encoding(self) -> str | None:
        return self._incoming.content_encoding

    @property
    def headers(self) -> Mapping[str, Any] | None:
        return self._incoming.headers

    @property
    def message_id(self) -> str | None:
        return self._incoming.message_id

    @property
    def timestamp(self) -> datetime | None:
        return self._incoming.timestamp

    @property
    def type(self) -> str | None:
        return self._incoming.type

    @property
    def user_id(self) -> str | None:
        return self._incoming.user_id

    @property
    def routing_key(self) -> str | None:
        return self._incoming.routing_key

    async def ack(self, multiple: bool = False) -> None:
        await self._incoming.ack(multiple=multiple)

    async def nack(self, requeue: bool = True) -> None:
        await self._incoming.nack(requeue=requeue)


def delivery_of(message: DeliveredMessage | IncomingMessage) -> AmqpDelivery:
    """The delivery a consumer's callback was given, whichever way it was consumed."""
    if isinstance(message, IncomingMessage):
        return RestoredDelivery(message)
    return AmqpDelivery(message)


class LeanQueue(RobustQueue):
    """A robust queue whose consumers get aiormq's deliveries (see the module's docstring).

    Declared through a channel whose ``QUEUE_CLASS`` is this class, so the channel restores it
    (and, through :meth:`consume`, its consumer) after a reconnection as it would its own."""

    async def consume(  # type: ignore[override]
        self,
        callback: Receiver,
        *,
        no_ack: bool = False,
        exclusive: bool = False,
        arguments: dict[str, Any] | None = None,
        consumer_tag: ConsumerTag | None = None,
        timeout: float | None = None,
        robust: bool = True,
    ) -> ConsumerTag:
        channel = await self.channel.get_underlay_channel()
        result = await channel.basic_consume(
            queue=self.name,
            consumer_callback=callback,
            exclusive=exclusive,
            no_ack=no_ack,
            arguments=arguments,
            consumer_tag=consumer_tag,
            timeout=timeout,
        )
        if result.consumer_tag is None:
            raise RuntimeError(f"RabbitMQ gave no consumer tag for queue {self.name}")
        if robust:
            # What RobustQueue.restore() calls consume() with again after a reconnection.
            self._consumers[result.consumer_tag] = {
                "callback": callback,
                "no_ack": no_ack,
                "exclusive": exclusive,
                "arguments": arguments,
            }
        return result.consumer_tag
