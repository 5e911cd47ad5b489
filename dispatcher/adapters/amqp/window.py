"""A confirm window written to the socket as one buffer.

aiormq's ``basic_publish`` queues every message as its own write: one ``send`` per message,
and on a small machine each send wakes RabbitMQ on the other core. Measured in
bench/README.md (the minimal baseline and the raw loop): marshalling a whole window into one
buffer halves the publisher's CPU per message and cuts RabbitMQ's by 3-4x. Here the frames of
every message of a window are marshalled together and queued once; the confirm futures are
registered in aiormq's channel exactly as ``basic_publish`` registers them (delivery tag,
message id for ``basic.return``), so aiormq's own handlers resolve them: an ack gives the
frame, a nack ``DeliveryError``, a returned ``mandatory`` message ``PublishError``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import (
    AMQPConnectionError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from pamqp.header import ContentHeader

from dispatcher.adapters.amqp.machine_queues import MachineQueues
from dispatcher.errors import BrokerUnavailable
from dispatcher.usecases.results import OutboxMessage

# RabbitMQ cannot be reached (as ``broker.UNREACHABLE``, which imports this module).
UNREACHABLE: tuple[type[BaseException], ...] = (
    AMQPConnectionError,
    ChannelInvalidStateError,
    ConnectionError,
    OSError,
)
_STATE = ("delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "lock")


@dataclass(frozen=True, slots=True)
class Outgoing:
    exchange: str
    routing_key: str
    body: bytes
    properties: aiormq.spec.Basic.Properties
    mandatory: bool


def supported(channel: Any) -> bool:
    """Whether this aiormq channel has the state the window uses (else: one by one)."""
    return bool(getattr(channel, "publisher_confirms", False)) and all(
        hasattr(channel, name) for name in _STATE
    )


async def publish_window(channel: Any, messages: Sequence[Outgoing]) -> list[BaseException | None]:
    """Publish ``messages`` as one write; wait for every confirm. One entry per message:
    ``None`` when confirmed, else the exception (a return, a nack, a closed channel)."""
    frames: list[Any] = []
    confirms: list[asyncio.Future[Any]] = []
    async with channel.lock:
        for message in messages:
            properties = message.properties
            if not properties.message_id:  # a returned message is matched by its id
                properties.message_id = uuid.uuid4().hex
            channel.delivery_tag += 1
            tag = channel.delivery_tag
            confirm = channel.create_future()
            channel.confirmations[tag] = confirm
            channel.message_id_delivery_tag[properties.message_id] = tag
            confirm.add_done_callback(_forget(channel, properties.message_id, tag))
            confirms.append(confirm)
            frames.append(
                aiormq.spec.Basic.Publish(
                    exchange=message.exchange,
                    routing_key=message.routing_key,
                    mandatory=message.mandatory,
                )
            )
            frames.append(ContentHeader(properties=properties, body_size=len(message.body)))
            frames.extend(channel._split_body(message.body))
        await channel.write_queue.put(
            ChannelFrame.marshall(channel_number=channel.number, frames=frames)
        )
    results = await asyncio.gather(*confirms, return_exceptions=True)
    return [r if isinstance(r, BaseException) else None for r in results]


async def write_outbox(
    channel: Any, messages: Sequence[OutboxMessage], exchanges: dict[str, str], user_id: str | None
) -> list[OutboxMessage]:
    """An outbox window as one write (events to ``exchanges["events"]``, the rest, mandatory,
    to ``exchanges["machines"]``); returns the messages RabbitMQ returned (unroutable)."""
    outgoing = [
        Outgoing(
            exchanges["events" if m.kind == "event" else "machines"],
            m.routing_key,
            m.body,
            json_properties(m.kind, m.id, user_id),
            m.kind != "event",
        )
        for m in messages
    ]
    results = await publish_window(channel, outgoing)
    raise_first([e for e in results if not isinstance(e, PublishError)])
    return [m for m, e in zip(messages, results, strict=True) if isinstance(e, PublishError)]


async def write_json(
    channel: Any,
    exchange: str,
    messages: Sequence[tuple[str, bytes]],
    *,
    kind: str,
    user_id: str | None,
    mandatory: bool,
) -> None:
    """JSON messages ``(routing key, body)`` to one exchange as one write; raises the first
    failure."""
    properties = [json_properties(kind, None, user_id) for _ in messages]
    outgoing = [
        Outgoing(exchange, key, body, props, mandatory)
        for (key, body), props in zip(messages, properties, strict=True)
    ]
    raise_first(await publish_window(channel, outgoing))


# A reply answers a worker waiting for it on a live connection: after a broker restart it is
# worth nothing (the worker asks again when no answer comes, and a request asked again is
# answered as the first was), so it is not written to disk. Persistent, every replies queue
# that ever held one kept a file handle of RabbitMQ's: at 1,000 machines that (with three per
# quorum queue) used up a node's default limit of 1,024 files, and the node stopped
# confirming publishes (bench/README.md, "RabbitMQ's file handles").
TRANSIENT_KINDS = frozenset({"reply"})


def delivery_mode_of(kind: str) -> int:
    """2 (persistent) for every message of the contract but the transient kinds (1)."""
    return 1 if kind in TRANSIENT_KINDS else 2


def json_properties(
    kind: str, message_id: str | None, user_id: str | None
) -> aiormq.spec.Basic.Properties:
    """A JSON message of the contract (``delivery_mode_of`` its kind), sent as ``user_id``."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=delivery_mode_of(kind),
        message_type=kind,
        message_id=message_id,
        user_id=user_id,
    )


def raise_first(results: Sequence[BaseException | None]) -> None:
    """Raise the first failure of a window (a channel closed under it as a closed channel:
    the caller treats it as RabbitMQ unreachable)."""
    for error in results:
        if isinstance(error, asyncio.CancelledError):
            raise ChannelInvalidStateError("the channel closed before the confirms came")
        if error is not None:
            raise error


def _forget(channel: Any, message_id: str, tag: int) -> Any:
    def forget(_: object) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            channel.message_id_delivery_tag.pop(message_id)

    return forget


class WindowPublishing(MachineQueues):
    """The broker's publishing of whole windows (mixed into ``Amqp``, which defines the
    methods declared here; the machine queues' part declares the rest)."""

    user_id: str

    if TYPE_CHECKING:  # defined by Amqp

        async def _underlay(self) -> Any: ...

        async def _renew_publisher(self, stuck: Any) -> None: ...

        async def _publish_one(self, message: OutboxMessage) -> None: ...

    async def _nacked(self, publisher: Any, exc: DeliveryError) -> BrokerUnavailable:
        """A window RabbitMQ nacked: its publisher channel is replaced (see .confirms)."""
        await self._renew_publisher(publisher)
        return BrokerUnavailable(f"publish nacked: {exc!r}")

    async def publish_outbox(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish outbox messages with confirms awaited as one window."""
        if not messages:
            return
        for message in messages:
            if message.kind != "event" and message.routing_key not in self._machine_queues:
                await self.ensure_machine_queue(message.routing_key)
        publisher = self.publisher
        channel = await self._underlay()
        if len(messages) == 1 or not supported(channel):
            await asyncio.gather(*(self._publish_one(m) for m in messages))
            return
        # One write for the whole window (see .window); a returned assignment is published
        # again alone, after its queue is declared, as _publish_one does.
        names = {role: self.exchange(role).name for role in ("events", "machines")}
        try:
            again = await write_outbox(channel, messages, names, self.user_id)
        except DeliveryError as exc:
            raise await self._nacked(publisher, exc) from exc
        await asyncio.gather(*(self._publish_one(m) for m in again))

    async def publish_many_json(
        self,
        role: str,
        messages: Sequence[tuple[str, bytes]],
        *,
        kind: str,
        mandatory: bool = True,
    ) -> None:
        """Publish JSON messages as one window written at once (see .window)."""
        publisher = self.publisher
        try:
            channel = await self._underlay()
            if len(messages) > 1 and supported(channel):
                exchange = self.exchange(role).name
                await write_json(
                    channel,
                    exchange,
                    messages,
                    kind=kind,
                    user_id=self.user_id,
                    mandatory=mandatory,
                )
            else:
                await asyncio.gather(
                    *(self._publish(role, k, b, kind, mandatory=mandatory) for k, b in messages)
                )
        except DeliveryError as exc:
            raise await self._nacked(publisher, exc) from exc
        except UNREACHABLE as exc:
            raise BrokerUnavailable(f"RabbitMQ is unavailable: {exc}") from exc
