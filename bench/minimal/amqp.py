"""aiormq, used directly: batched consumption, ordered multi-acks, confirmed publish windows.

aio-pika's ``Exchange.publish`` holds the channel lock until each frame is written and wraps
every delivery in an ``IncomingMessage``; here the frames go straight to aiormq's channel.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

PERSISTENT = 2
PUBLISH_MODES = ("frames", "aiormq")

Delivery = DeliveredMessage
Handler = Callable[[list[DeliveredMessage]], Awaitable[None]]


def queue_arguments(kind: str) -> dict[str, Any]:
    """``quorum`` (what the product declares for requests and machine queues) or ``classic``."""
    if kind == "quorum":
        return {"x-queue-type": "quorum"}
    if kind == "classic":
        return {"x-queue-type": "classic"}
    raise ValueError(f"unknown queue type {kind!r} (quorum or classic)")


class Batches:
    """The deliveries of one consumer, handed out as batches of what is ready (at most
    ``size``, no linger: light load still sees single-message batches)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ready: collections.deque[DeliveredMessage] = collections.deque()
        self._wakeup = asyncio.Event()

    def put(self, message: DeliveredMessage) -> None:
        self._ready.append(message)
        self._wakeup.set()

    async def next(self) -> list[DeliveredMessage]:
        while not self._ready:
            self._wakeup.clear()
            await self._wakeup.wait()
        ready = self._ready
        take = min(self.size, len(ready))
        return [ready.popleft() for _ in range(take)]


class OrderedAcks:
    """``basic.ack(multiple)`` acks every earlier delivery too, so when batches overlap a
    batch acks only after every batch taken before it has acked."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._last: asyncio.Future[None] | None = None

    def ticket(self) -> tuple[asyncio.Future[None] | None, asyncio.Future[None]]:
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous, self._last = self._last, mine
        return previous, mine

    async def ack(
        self,
        ticket: tuple[asyncio.Future[None] | None, asyncio.Future[None]],
        delivery_tag: int,
    ) -> None:
        previous, mine = ticket
        if previous is not None and not previous.done():
            await previous
        await self.channel.basic_ack(delivery_tag, multiple=True, wait=False)
        mine.set_result(None)


async def serve_batches(
    channel: aiormq.abc.AbstractChannel,
    queue: str,
    handle: Callable[[list[DeliveredMessage]], Awaitable[None]],
    *,
    batch: int,
    depth: int,
) -> None:
    """Consume ``queue``: per batch ``handle`` (its publishes confirmed), then one multi-ack.
    Up to ``depth`` batches are handled at once (the next batch does not wait for the
    previous one's confirms); acks stay in delivery order."""
    batches = Batches(batch)
    acks = OrderedAcks(channel)
    await channel.basic_consume(queue, batches.put, no_ack=False)  # type: ignore[arg-type]
    slots = asyncio.Semaphore(depth)
    running: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    async def one(items: list[DeliveredMessage], ticket: Any) -> None:
        try:
            await handle(items)
            await acks.ack(ticket, items[-1].delivery.delivery_tag)
        except BaseException as exc:
            failed.append(exc)
            raise
        finally:
            slots.release()

    while not failed:
        items = await batches.next()
        await slots.acquire()
        ticket = acks.ticket()
        if depth == 1:
            await one(items, ticket)
            continue
        task = asyncio.create_task(one(items, ticket))
        running.add(task)
        task.add_done_callback(running.discard)
    # A failed batch is a broken benchmark: stop the process loudly.
    raise failed[0]


def properties(
    message_id: str | None = None, correlation_id: str | None = None
) -> aiormq.spec.Basic.Properties:
    """Persistent; a ``message_id`` given spares aiormq a random UUID per publish."""
    return aiormq.spec.Basic.Properties(
        delivery_mode=PERSISTENT, message_id=message_id, correlation_id=correlation_id
    )


async def publish_window(
    channel: aiormq.abc.AbstractChannel,
    messages: Sequence[tuple[str, bytes, aiormq.spec.Basic.Properties]],
) -> None:
    """Publish ``(routing key, body, properties)`` through the default exchange, confirms
    awaited together (a nack raises)."""
    confirms = await asyncio.gather(
        *(
            channel.basic_publish(body, routing_key=key, properties=props, wait=False)
            for key, body, props in messages
        )
    )
    for confirm in confirms:
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise RuntimeError(f"publish not confirmed: {confirm!r}")


async def publish_frames(
    channel: aiormq.abc.AbstractChannel,
    messages: Sequence[tuple[str, bytes, aiormq.spec.Basic.Properties]],
) -> None:
    """The same window written as **one** frame buffer: one ``send`` for the whole window
    instead of one per message (aiormq's writer writes each queued frame on its own, and on
    this machine every send that wakes RabbitMQ costs tens of µs; the profile of a minimal
    dispatcher showed a quarter of its samples in ``transport.write``).

    It uses aiormq's channel state (``delivery_tag``, ``confirmations``, ``write_queue``) as
    ``Channel.basic_publish`` does, under the channel's lock; the confirm futures it
    registers are resolved by aiormq's own confirm handler (a nack raises)."""
    ch = channel
    if not all(hasattr(ch, a) for a in ("delivery_tag", "confirmations", "write_queue", "lock")):
        raise RuntimeError("this aiormq version does not have the channel state used here")
    loop = asyncio.get_running_loop()
    frames: list[Any] = []
    confirms: list[asyncio.Future[Any]] = []
    async with ch.lock:  # type: ignore[attr-defined]
        for key, body, props in messages:
            ch.delivery_tag += 1  # type: ignore[attr-defined]
            confirm = loop.create_future()
            ch.confirmations[ch.delivery_tag] = confirm  # type: ignore[attr-defined]
            confirms.append(confirm)
            frames.append(aiormq.spec.Basic.Publish(exchange="", routing_key=key))
            frames.append(ContentHeader(properties=props, body_size=len(body)))
            frames.append(ContentBody(body))  # bodies here are far below frame_max
        payload = ChannelFrame.marshall(channel_number=ch.number, frames=frames)
        await ch.write_queue.put(payload)  # type: ignore[attr-defined]
    await asyncio.gather(*confirms)


async def publish(
    channel: aiormq.abc.AbstractChannel,
    messages: Sequence[tuple[str, bytes, aiormq.spec.Basic.Properties]],
    mode: str,
) -> None:
    """``frames`` (one write per window) or ``aiormq`` (``basic_publish`` per message)."""
    if mode == "frames":
        await publish_frames(channel, messages)
    else:
        await publish_window(channel, messages)


async def open_channel(
    connection: aiormq.abc.AbstractConnection, prefetch: int = 0, confirms: bool = True
) -> aiormq.abc.AbstractChannel:
    channel = await connection.channel(publisher_confirms=confirms)
    if prefetch:
        await channel.basic_qos(prefetch_count=prefetch)
    return channel
