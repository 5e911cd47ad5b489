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
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.header import ContentHeader

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


def json_properties(
    kind: str, message_id: str | None, user_id: str | None
) -> aiormq.spec.Basic.Properties:
    """A persistent JSON message of the contract, sent as ``user_id``."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
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
