"""Declaring a shared queue again with other arguments, keeping its messages
(``rundispatch queues migrate``): after a change of ``active_replicas`` on a namespace whose
requests and workers' requests queues already exist.

RabbitMQ cannot change a queue's arguments (nor can a policy set ``x-single-active-consumer``):
the queue is deleted and declared again. Its messages (runs asked for, workers' starts and
outcomes) move to a holding queue, ``<queue>.moving``, and back. The holding queue is bound
like the queue before the queue is unbound, and unbound only after the new queue is bound:
nothing published meanwhile is unroutable. A message published in the instant both are bound
arrives twice; the dispatcher handles that as it handles a redelivery (a run id is admitted
once, a worker's start or finish is answered again).

A moved message keeps its ``user_id``: receivers know the sender by it
(``core/principals.sender_of``), and RabbitMQ lets only a user with the ``impersonator`` tag
publish with another user's id. The messages move as a temporary user with that tag, allowed
to read the two queues and write to the default exchange only, deleted at the end.

Every step can be repeated: a move cut short (the tool killed, the broker lost) is finished by
running the command again. No message is acknowledged before its copy is confirmed, so none is
lost; the copies of a batch confirmed but not yet acknowledged when the move was cut (at most
``MOVE_BATCH``) arrive twice, handled as redeliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from dispatcher.adapters.amqp.cluster import connect_any, split_urls
from dispatcher.adapters.amqp.identities import BrokerIdentities
from dispatcher.adapters.amqp.topology import run_queue_bindings
from dispatcher.core.principals import Permissions, Principal
from dispatcher.errors import ConfigurationError
from dispatcher.names import Names

HOLDING_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}
# Headers RabbitMQ sets on a delivery, not the publisher's: not copied.
BROKER_HEADERS = ("x-delivery-count",)
MOVE_BATCH = 200
# A queue nothing routes to is empty once no message has arrived for this long.
IDLE_S = 1.0


class QueueState(enum.StrEnum):
    """A shared queue against this configuration's arguments for it."""

    missing = "missing"
    as_configured = "as configured"
    differs = "declared with other arguments"
    migrated = "declared again, its messages kept"


@dataclass(frozen=True, slots=True)
class Migration:
    """One queue after ``migrate_queue`` (``as_configured`` or ``migrated``; ``moved``: the
    messages the queue declared again received from its holding queue), or as a dry run
    found it."""

    queue: str
    state: QueueState
    moved: int = 0


async def queue_state(
    connection: AbstractConnection, queue: str, arguments: dict[str, Any]
) -> QueueState:
    """``missing``, ``as_configured`` or ``differs``."""
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, passive=True)
    except ChannelNotFoundEntity:
        return QueueState.missing
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    channel = await connection.channel()
    try:
        await channel.declare_queue(queue, durable=True, arguments=arguments)
    except ChannelPreconditionFailed:
        return QueueState.differs
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return QueueState.as_configured


async def migrate_queue(
    connection: AbstractConnection,
    mover: AbstractConnection,
    names: Names,
    queue: str,
    arguments: dict[str, Any],
    *,
    progress: Callable[[str], None],
) -> Migration:
    """Declare ``queue`` (one of ``run_queue_bindings``) again with ``arguments``, keeping its
    messages (see the module). ``connection``: an identity that may configure the namespace;
    ``mover``: the impersonator. ``ConfigurationError`` while a process consumes the queue
    (stop the dispatchers first)."""
    state = await queue_state(connection, queue, arguments)
    holding = names.holding_queue(queue)
    held = await queue_state(connection, holding, HOLDING_ARGUMENTS) != QueueState.missing
    if state == QueueState.as_configured and not held:
        return Migration(queue, QueueState.as_configured)
    exchange, keys = run_queue_bindings(names)[queue]
    channel = await connection.channel()
    moved = 0
    try:
        if state == QueueState.differs:
            declared = await channel.declare_queue(queue, passive=True)
            consumers = declared.declaration_result.consumer_count or 0
            if consumers:
                raise ConfigurationError(
                    f"{consumers} consumer(s) on {queue}: stop every dispatcher replica first"
                )
            kept = await channel.declare_queue(holding, durable=True, arguments=HOLDING_ARGUMENTS)
            for key in keys:
                await kept.bind(exchange, key)
            for key in keys:
                await declared.unbind(exchange, key)
            await move(mover, queue, holding, progress)
            await delete_if_empty(channel, queue)
        fresh = await channel.declare_queue(queue, durable=True, arguments=arguments)
        for key in keys:
            await fresh.bind(exchange, key)
        kept = await channel.declare_queue(holding, durable=True, arguments=HOLDING_ARGUMENTS)
        for key in keys:
            await kept.unbind(exchange, key)
        moved = await move(mover, holding, queue, progress)
        await delete_if_empty(channel, holding)
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return Migration(queue, QueueState.migrated, moved)


async def delete_if_empty(channel: AbstractChannel, queue: str) -> None:
    """Delete a queue found empty (quorum queues refuse ``if_empty``; nothing routes to this
    one any more, so what is empty now stays empty). ``ConfigurationError`` otherwise."""
    left = (await channel.declare_queue(queue, passive=True)).declaration_result.message_count
    if left:
        raise ConfigurationError(f"{queue} still holds {left} messages; run the command again")
    await channel.queue_delete(queue)


async def move(
    mover: AbstractConnection, source: str, target: str, progress: Callable[[str], None]
) -> int:
    """Every message of ``source`` to ``target``, as it was published (``user_id`` and headers
    included); each acknowledged once its copy is confirmed. The count moved. Consumed, not
    fetched: RabbitMQ refuses ``basic.get`` on a quorum queue with a single active consumer.
    Done when nothing arrives for ``IDLE_S`` (nothing routes to ``source`` any more)."""
    channel = await mover.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=MOVE_BATCH)
    queue = await channel.get_queue(source, ensure=False)  # it may declare nothing
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(inbox.put, no_ack=False)
    moved = 0
    try:
        while True:
            try:
                batch = [await asyncio.wait_for(inbox.get(), IDLE_S)]
            except TimeoutError:
                return moved
            while len(batch) < MOVE_BATCH and not inbox.empty():
                batch.append(inbox.get_nowait())
            await asyncio.gather(
                *(
                    channel.default_exchange.publish(copy_of(message), routing_key=target)
                    for message in batch
                )
            )  # every copy confirmed before its original is acknowledged
            await batch[-1].ack(multiple=True)
            moved += len(batch)
            progress(f"{source} -> {target}: {moved} moved")
    finally:
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        with contextlib.suppress(Exception):
            await channel.close()


def copy_of(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {k: v for k, v in (message.headers or {}).items() if k not in BROKER_HEADERS}
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=message.delivery_mode,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        expiration=message.expiration,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=message.user_id,
        app_id=message.app_id,
    )


def mover_principal(names: Names) -> Principal:
    """The temporary impersonator: reads the queues that hold runs and their holding queues,
    writes to the default exchange only, configures nothing."""
    queues = [*run_queue_bindings(names), *map(names.holding_queue, run_queue_bindings(names))]
    readable = "|".join(re.escape(q) for q in queues)
    return Principal(
        kind="operator",
        name="queue-migration",
        username=names.migration_user,
        permissions=Permissions(
            configure="^$",
            write=rf"^(amq\.default|{readable})$",
            read=rf"^({readable})$",
        ),
    )


@contextlib.asynccontextmanager
async def impersonator(
    admin_url: str, vhost: str, names: Names, url_for: Callable[[str, str], str]
) -> AsyncIterator[AbstractConnection]:
    """A connection of the temporary impersonator user (``mover_principal``), deleted after."""
    principal = mover_principal(names)
    password = secrets.token_urlsafe(24)
    async with BrokerIdentities(admin_url, vhost) as identities:
        await identities.put(principal, password, tags="impersonator")
        try:
            # On a cluster the URL lists every node: the first that answers.
            connection = await connect_any(split_urls(url_for(principal.username, password)))
            async with connection:
                yield connection
        finally:
            await identities.delete(principal.username)
