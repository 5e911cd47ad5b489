"""RabbitMQ: topology, confirmed publishing, and batched consuming with one ack decision point.

Publishing always waits for publisher confirms, but as a window (many publishes in flight,
confirms awaited together), never one by one. Messages to machine queues are ``mandatory``: a
message RabbitMQ cannot route raises instead of vanishing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
import redis.exceptions
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import PublishError
from aiormq.exceptions import ChannelPreconditionFailed

from dispatcher.adapters.records import OutboxMessage
from dispatcher.names import Names

log = logging.getLogger(__name__)

DELIVERY_LIMIT = 5
SIGNALS_ARGUMENTS: dict[str, Any] = {"x-message-ttl": 60_000}
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
# How long a consumer keeps retrying a batch whose handler hit a transient failure (Redis
# down or restarting) before it hands the messages back (well under the consumer timeout).
HOLD_S = 60.0
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    TimeoutError,
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
TERMINAL_EVENT_KEYS = ("run.succeeded", "run.failed", "run.cancelled", "run.timed_out")
REASON_HEADER = "x-rundispatch-reason"


@dataclass(frozen=True, slots=True)
class Ack:
    """The message's effect is durably recorded."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The message breaks the contract: copy it to the dead-letter queue with ``reason``."""

    reason: str
    reason_class: str


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: give the message back to RabbitMQ for another try.

    ``outage``: the store (or broker) could not be reached. The consumer then keeps the
    delivery and tries again itself for a while (see ``Amqp._decide``).
    """

    error: str
    outage: bool = False


def retry_for(exc: BaseException) -> Retry:
    """The verdict for a message whose handling raised ``exc``."""
    return Retry(repr(exc), outage=isinstance(exc, TRANSIENT_ERRORS))


Verdict = Ack | DeadLetter | Retry
BatchHandler = Callable[[Sequence[AbstractIncomingMessage]], Awaitable[list[Verdict]]]


def quorum_arguments(names: Names) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": names.dead_exchange,
    }


class Amqp:
    """One robust connection, a confirming publisher channel, and consumers."""

    def __init__(self, url: str, names: Names, prefetch: int = 200) -> None:
        self.url = url
        self.names = names
        self.prefetch = prefetch
        self.connection: AbstractRobustConnection | None = None
        self._publisher: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._machine_queues: set[str] = set()
        self._consumer_channels: list[AbstractChannel] = []

    async def connect(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": f"rundispatch:{self.names.ns}"}
        )
        self._publisher = await self.connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self.declare_topology()

    async def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
            self.connection = None

    @property
    def publisher(self) -> AbstractChannel:
        if self._publisher is None:
            raise RuntimeError("not connected")
        return self._publisher

    async def declare_topology(self) -> None:
        """Declare every exchange and shared queue of the public contract (idempotent)."""
        names, channel = self.names, self.publisher
        direct, topic, fanout = (
            aio_pika.ExchangeType.DIRECT,
            aio_pika.ExchangeType.TOPIC,
            aio_pika.ExchangeType.FANOUT,
        )
        dead = await channel.declare_exchange(names.dead_exchange, fanout, durable=True)
        dead_queue = await channel.declare_queue(
            names.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        requests = await channel.declare_exchange(names.requests_exchange, direct, durable=True)
        requests_queue = await channel.declare_queue(
            names.requests_queue, durable=True, arguments=quorum_arguments(names)
        )
        await requests_queue.bind(requests, "submit")
        await requests_queue.bind(requests, "cancel")
        events = await channel.declare_exchange(names.events_exchange, topic, durable=True)
        machines = await channel.declare_exchange(names.machines_exchange, direct, durable=True)
        heartbeats = await channel.declare_exchange(names.heartbeats_exchange, fanout, durable=True)
        heartbeats_queue = await channel.declare_queue(
            names.heartbeats_queue, durable=True, arguments={"x-message-ttl": 60_000}
        )
        await heartbeats_queue.bind(heartbeats)
        # Signals are hints (a slot freed, a machine changed): a lost one costs at most the
        # periodic re-sweep, so a classic queue's lower latency and cost win over a quorum's.
        await self._replace_if_declared_otherwise(names.signals_queue, SIGNALS_ARGUMENTS)
        signals = await channel.declare_queue(
            names.signals_queue, durable=True, arguments=SIGNALS_ARGUMENTS
        )
        for key in (*TERMINAL_EVENT_KEYS, "machine.#"):
            await signals.bind(events, key)
        self._exchanges = {
            "dead": dead,
            "requests": requests,
            "events": events,
            "machines": machines,
            "heartbeats": heartbeats,
        }

    async def _replace_if_declared_otherwise(self, name: str, arguments: dict[str, Any]) -> None:
        """Re-create a queue of hints that an earlier version declared with other arguments
        (RabbitMQ refuses the new declaration with PRECONDITION_FAILED otherwise). Only for
        queues whose messages may be lost: the signals queue."""
        assert self.connection is not None
        probe = await self.connection.channel()
        try:
            await probe.declare_queue(name, durable=True, arguments=arguments)
        except ChannelPreconditionFailed:
            log.warning("queue %s was declared with other arguments; re-creating it", name)
            fresh = await self.connection.channel()
            await fresh.queue_delete(name)
            await fresh.close()
        finally:
            if not probe.is_closed:
                await probe.close()

    def exchange(self, role: str) -> AbstractExchange:
        return self._exchanges[role]

    async def ensure_machine_queue(self, machine_id: str) -> AbstractQueue:
        """Declare a machine's queue (quorum, bound to the machines exchange by machine id)."""
        queue = await self.publisher.declare_queue(
            self.names.machine_queue(machine_id),
            durable=True,
            arguments=quorum_arguments(self.names),
        )
        if machine_id not in self._machine_queues:
            await queue.bind(self.exchange("machines"), machine_id)
            self._machine_queues.add(machine_id)
        return queue

    async def publish_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish outbox messages with confirms awaited as one window."""
        if not messages:
            return
        for message in messages:
            if message.kind != "event" and message.routing_key not in self._machine_queues:
                await self.ensure_machine_queue(message.routing_key)
        await asyncio.gather(*(self._publish_one(m) for m in messages))

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
        """One persistent JSON message, confirmed; a returned one raises PublishError.

        The hot path of every run (five publishes each): straight to the channel under the
        robust channel, with the properties built here, and no wait for the frame to reach
        the socket before waiting for the confirm (``Exchange.publish`` holds the channel's
        lock until the socket is drained, one publish at a time; ~15 % of the CPU of a
        publish, see bench/README.md).
        """
        exchange = self.exchange(role)
        channel = cast(aiormq.Channel, await self.publisher.get_underlay_channel())
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=PERSISTENT,
            message_type=kind,
            message_id=message_id,
        )
        await channel.basic_publish(
            body,
            exchange=exchange.name,
            routing_key=routing_key,
            properties=properties,
            mandatory=role != "events" if mandatory is None else mandatory,
            wait=False,
        )

    async def publish_json(
        self, role: str, routing_key: str, body: bytes, *, kind: str, mandatory: bool = True
    ) -> None:
        """Publish one persistent JSON message to an exchange of the contract."""
        await self._publish(role, routing_key, body, kind, mandatory=mandatory)

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Copy a message to the dead-letter queue with the reason in a header."""
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:1000]
        headers["x-rundispatch-source"] = message.routing_key or ""
        await self.exchange("dead").publish(
            aio_pika.Message(
                message.body,
                headers=headers,
                content_type=message.content_type,
                content_encoding=message.content_encoding,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                type=message.type,
            ),
            routing_key="",
            mandatory=True,
        )

    async def consume_batches(
        self,
        queue_name: str,
        handler: BatchHandler,
        *,
        batch_size: int,
        prefetch: int | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> asyncio.Task[None]:
        """Consume ``queue_name`` in batches; apply the handler's verdicts (the one ack point)."""
        if self.connection is None:
            raise RuntimeError("not connected")
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch or self.prefetch)
        self._consumer_channels.append(channel)
        # Declared (passively), not just looked up: a robust channel re-creates only the
        # consumers of queues it declared, so ``get_queue(ensure=False)`` would leave this
        # consumer dead after a reconnection.
        queue = await channel.declare_queue(queue_name, passive=True)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        await queue.consume(inbox.put, no_ack=False, arguments=arguments)

        async def loop() -> None:
            while True:
                first = await inbox.get()
                batch = [first]
                while len(batch) < batch_size and not inbox.empty():
                    batch.append(inbox.get_nowait())
                verdicts = await self._decide(handler, batch)
                await self._settle(batch, verdicts)

        return asyncio.create_task(loop(), name=f"consume:{queue_name}")

    async def _decide(
        self, handler: BatchHandler, batch: Sequence[AbstractIncomingMessage]
    ) -> list[Verdict]:
        """The handler's verdicts, retrying transient failures here while holding the deliveries.

        Handing a message back to a quorum queue counts as a delivery: a store outage of a few
        seconds would otherwise use up its delivery limit and dead-letter a valid request or
        assignment. So a batch (or the part of it) that failed because the store could not be
        reached is handled again here, with backoff, for up to ``HOLD_S``; any other failure
        (a crash, a permanent error) goes back to RabbitMQ at once, as before.
        """
        verdicts: list[Verdict] = [Retry("not handled")] * len(batch)
        todo = list(range(len(batch)))
        deadline = time.monotonic() + HOLD_S
        delay = 0.25
        while True:
            subset = [batch[index] for index in todo]
            try:
                decided = await handler(subset)
            except TRANSIENT_ERRORS as exc:
                log.warning("store or broker unavailable, holding %d messages: %s", len(todo), exc)
                decided = [retry_for(exc)] * len(subset)
            except Exception:
                log.exception("batch of %d failed; messages go back to the queue", len(subset))
                for index in todo:
                    verdicts[index] = Retry("handler crashed")
                return verdicts
            for index, verdict in zip(todo, decided, strict=True):
                verdicts[index] = verdict
            todo = [
                index
                for index in todo
                if isinstance(verdict := verdicts[index], Retry) and verdict.outage
            ]
            if not todo or time.monotonic() + delay > deadline:
                return verdicts
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _settle(
        self, batch: Sequence[AbstractIncomingMessage], verdicts: Sequence[Verdict]
    ) -> None:
        if any(isinstance(verdict, Retry) for verdict in verdicts):
            # Back off before handing messages back, or a dead store turns into a hot loop.
            await asyncio.sleep(0.5)
        if all(isinstance(verdict, Ack) for verdict in verdicts):
            # The usual case: one frame acks the whole batch. The batch is every delivery of
            # this channel up to its last one that is not settled yet (batches are settled in
            # delivery order), so ``multiple`` acks exactly the batch.
            try:
                await batch[-1].ack(multiple=True)
            except Exception:
                log.warning("could not ack a batch; it will be redelivered", exc_info=True)
            return
        for message, verdict in zip(batch, verdicts, strict=True):
            try:
                if isinstance(verdict, DeadLetter):
                    await self.dead_letter(message, verdict.reason)
                    await message.ack()
                elif isinstance(verdict, Retry):
                    await message.nack(requeue=True)
                else:
                    await message.ack()
            except Exception:
                # The channel is gone: RabbitMQ redelivers the message, dedupe absorbs it.
                log.warning("could not settle a delivery; it will be redelivered", exc_info=True)
