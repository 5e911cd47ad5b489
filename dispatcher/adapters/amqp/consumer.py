"""The batched consumer: the one place that decides what happens to a delivery.

A handler gets a batch of deliveries and answers one verdict each (``Ack``, ``DeadLetter``,
``Retry``; see ``usecases.ports``). What a handler raises is decided from the error tree
alone: ``Unavailable`` (the store or the broker cannot be reached) is held and retried here,
anything else goes back to RabbitMQ at once. An outage that outlasts the hold does not use up
the delivery limit either: the message is published again to its queue (a fresh copy, with
no delivery count) before the held delivery is acked.

    deliveries ─▶ batch ─▶ handler ─▶ verdicts ─▶ (hold and retry outages) ─▶ ack / dead-letter
                                                                              / requeue
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence

import aio_pika
from aio_pika.abc import AbstractExchange

from dispatcher.adapters.amqp.delivery import AmqpDelivery
from dispatcher.core.principals import HELD_FOR_HEADER, publisher_of
from dispatcher.errors import Unavailable
from dispatcher.retry import Backoff
from dispatcher.usecases.ports import Ack, BatchHandler, DeadLetter, Retry, Verdict, retry_for

log = logging.getLogger(__name__)

# How long a consumer keeps retrying a batch whose handler hit an outage (Redis down or
# restarting) before it publishes the messages again (well under the consumer timeout); the
# ``outage_hold_s`` setting.
HOLD_S = 60.0
HOLD_BACKOFF = Backoff(first_s=0.25, max_s=5.0)
REASON_HEADER = "x-rundispatch-reason"
HELD_HEADER = "x-rundispatch-held"

DeadLetterer = Callable[[AmqpDelivery, str], Awaitable[None]]
Republisher = Callable[[AmqpDelivery], Awaitable[None]]
OutageHook = Callable[[bool], None]


def _no_hook(_: bool) -> None:
    return None


async def decide(
    handler: BatchHandler,
    batch: Sequence[AmqpDelivery],
    hold_s: float | None = None,
    on_outage: OutageHook = _no_hook,
) -> list[Verdict]:
    """The handler's verdicts, retrying outages here while holding the deliveries.

    Handing a message back to a quorum queue counts as a delivery: a store outage of a few
    seconds would otherwise use up its delivery limit and dead-letter a valid request or
    assignment. So a batch (or the part of it) that failed because a service could not be
    reached is handled again here, with backoff, for up to ``hold_s`` (``HOLD_S`` if not
    given); any other failure (a crash, a permanent error) goes back to RabbitMQ at once.
    ``on_outage(True)`` is called while an outage holds messages, ``on_outage(False)`` when
    the batch is decided.
    """
    verdicts: list[Verdict] = [Retry("not handled")] * len(batch)
    todo = list(range(len(batch)))
    deadline = time.monotonic() + (HOLD_S if hold_s is None else hold_s)
    delays = HOLD_BACKOFF.delays()
    while True:
        subset = [batch[index] for index in todo]
        try:
            decided = await handler(subset)
        except Unavailable as exc:
            log.warning("store or broker unavailable, holding %d messages: %s", len(todo), exc)
            decided = [retry_for(exc)] * len(subset)
        except Exception:
            log.exception("batch of %d failed; messages go back to the queue", len(subset))
            for index in todo:
                verdicts[index] = Retry("handler crashed")
            on_outage(False)
            return verdicts
        for index, verdict in zip(todo, decided, strict=True):
            verdicts[index] = verdict
        todo = [
            index
            for index in todo
            if isinstance(verdict := verdicts[index], Retry) and verdict.outage
        ]
        on_outage(bool(todo))
        delay = next(delays)
        if not todo or time.monotonic() + delay > deadline:
            return verdicts
        await asyncio.sleep(delay)


async def settle(
    batch: Sequence[AmqpDelivery],
    verdicts: Sequence[Verdict],
    dead_letter: DeadLetterer,
    republish: Republisher | None = None,
) -> None:
    """Apply the verdicts: ack, dead-letter (copy, then ack), republish (an outage that
    outlasted the hold: copy to the same queue, then ack) or requeue."""
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
                await dead_letter(message, verdict.reason)
                await message.ack()
            elif isinstance(verdict, Retry) and verdict.outage and republish is not None:
                # A nack would count as a delivery: an outage longer than the delivery limit
                # times the hold would dead-letter accepted work.
                await republish(message)
                await message.ack()
            elif isinstance(verdict, Retry):
                await message.nack(requeue=True)
            else:
                await message.ack()
        except Exception:
            # The channel is gone: RabbitMQ redelivers the message, dedupe absorbs it.
            log.warning("could not settle a delivery; it will be redelivered", exc_info=True)


async def copy_to_dead_letters(
    exchange: AbstractExchange, message: AmqpDelivery, reason: str
) -> None:
    """Copy a message to the dead-letter queue with the reason in a header."""
    headers = dict(message.headers or {})
    headers[REASON_HEADER] = reason[:1000]
    headers["x-rundispatch-source"] = message.routing_key or ""
    await exchange.publish(
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


def held_copy(message: AmqpDelivery, user_id: str) -> aio_pika.Message:
    """The message as published again after an outage by the connection of user ``user_id``
    (same body and properties; the ``x-rundispatch-held`` header counts the holds).

    RabbitMQ refuses a ``user_id`` other than the connection's own, so the copy carries
    ``user_id`` and names the message's first publisher in ``HELD_FOR_HEADER``: the receiver
    still knows who sent it (``core/principals.publisher_of``)."""
    headers = dict(message.headers or {})
    held = headers.get(HELD_HEADER)
    headers[HELD_HEADER] = (held if isinstance(held, int) else 0) + 1
    headers[HELD_FOR_HEADER] = publisher_of(user_id, message.user_id, message.headers) or ""
    headers.pop("x-delivery-count", None)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        type=message.type,
        timestamp=message.timestamp,
        user_id=user_id,
    )


class ConsumerLoop:
    """The consumer's loop: take what is ready (at most ``batch_size``, after waiting
    ``gather_s`` for more when the first delivery comes), decide, settle.

    ``drain()`` (after RabbitMQ confirmed the consumer is cancelled, so that nothing more
    arrives): the batch in hand and every delivery already received are decided and settled,
    then the loop ends; nothing is handed back to the queue.
    """

    def __init__(
        self,
        inbox: asyncio.Queue[AmqpDelivery],
        handler: BatchHandler,
        batch_size: int,
        dead_letter: DeadLetterer,
        *,
        hold_s: float | None = None,
        republish: Republisher | None = None,
        on_outage: OutageHook = _no_hook,
        gather_s: float = 0.0,
    ) -> None:
        self.inbox = inbox
        self.handler = handler
        self.batch_size = batch_size
        self.dead_letter = dead_letter
        self.hold_s = hold_s
        self.republish = republish
        self.on_outage = on_outage
        self.gather_s = gather_s
        self.stopping = False
        self.busy = False
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        inbox = self.inbox
        while not (self.stopping and inbox.empty()):
            first = await inbox.get()
            self.busy = True
            try:
                if self.gather_s and inbox.qsize() + 1 < self.batch_size and not self.stopping:
                    # Worth a short wait: more of the batch arrives meanwhile, handled at the
                    # cost of one batch.
                    await asyncio.sleep(self.gather_s)
                batch = [first]
                while len(batch) < self.batch_size and not inbox.empty():
                    batch.append(inbox.get_nowait())
                verdicts = await decide(self.handler, batch, self.hold_s, self.on_outage)
                await settle(batch, verdicts, self.dead_letter, self.republish)
            finally:
                self.busy = False

    async def drain(self) -> None:
        """Finish what was received, then end (the caller bounds how long this may take)."""
        self.stopping = True
        task = self.task
        if task is None:
            return
        if not self.busy and self.inbox.empty():
            task.cancel()  # idle, waiting for a delivery that will not come
        await asyncio.gather(task, return_exceptions=True)


def consume_loop(
    inbox: asyncio.Queue[AmqpDelivery],
    handler: BatchHandler,
    batch_size: int,
    dead_letter: DeadLetterer,
    *,
    hold_s: float | None = None,
    republish: Republisher | None = None,
    on_outage: OutageHook = _no_hook,
) -> Callable[[], Coroutine[None, None, None]]:
    """The loop of a :class:`ConsumerLoop` that is never drained."""
    return ConsumerLoop(
        inbox,
        handler,
        batch_size,
        dead_letter,
        hold_s=hold_s,
        republish=republish,
        on_outage=on_outage,
    ).run
