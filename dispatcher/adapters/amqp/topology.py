"""The AMQP contract's topology: every exchange and shared queue, declared idempotently, and
deleted with a namespace (demos, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import ChannelPreconditionFailed

from dispatcher.adapters.amqp.cluster import connect_any, split_urls
from dispatcher.core.principals import DELIVERY_LIMIT, quorum_arguments, replies_arguments
from dispatcher.names import TERMINAL_EVENT_KEYS, Names, event_binding

log = logging.getLogger(__name__)
__all__ = ["DELIVERY_LIMIT", "quorum_arguments"]  # re-exported: defined in core/principals

SIGNALS_ARGUMENTS: dict[str, Any] = {"x-message-ttl": 60_000}
HEARTBEATS_ARGUMENTS: dict[str, Any] = {"x-message-ttl": 60_000}
# Dead letters are kept for inspection, up to this many (the ``dead_letter_max`` setting).
DEAD_LETTER_MAX = 100_000


def dead_letter_arguments(limit: int = DEAD_LETTER_MAX) -> dict[str, Any]:
    """The dead-letter queue: a quorum queue of at most ``limit`` messages; past it the
    oldest are dropped (``drop-head``): ``reject-publish`` would refuse the copy, and the
    message would stay unacknowledged in its own queue, blocking it."""
    return {"x-queue-type": "quorum", "x-max-length": limit, "x-overflow": "drop-head"}


def hint_arguments(cluster: bool) -> dict[str, Any]:
    """The heartbeats' and signals' queues: hints with a TTL. On one node a classic queue
    (lower latency and cost); on a cluster a quorum queue, since a classic queue is gone with
    its node, and with it every client's connection recovery (aio-pika re-declares it)."""
    base = {**HEARTBEATS_ARGUMENTS, **SIGNALS_ARGUMENTS}
    return {**base, "x-queue-type": "quorum"} if cluster else base


# ``active_replicas=one``: RabbitMQ delivers each queue the replicas consume to one consumer
# at a time and hands it to another only when that one's channel or connection closes. A
# second replica then costs almost nothing and adds no capacity (bench/README.md, "One
# active replica"); in the default, every replica consumes every queue.
ONE_ACTIVE_ARGUMENTS: dict[str, Any] = {"x-single-active-consumer": True}


def consumed_queues(names: Names) -> list[str]:
    """The shared queues every replica consumes (one consumer at a time with
    ``active_replicas=one``)."""
    return [names.requests_queue, names.reports_queue, names.heartbeats_queue, names.signals_queue]


def run_queue_bindings(names: Names) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The shared queues that hold runs, each with its exchange and routing keys."""
    return {
        names.requests_queue: (names.requests_exchange, ("submit", "cancel")),
        names.reports_queue: (names.reports_exchange, ("report",)),
    }


def shared_queue_arguments(
    names: Names,
    *,
    cluster: bool = False,
    dead_letter_max: int = DEAD_LETTER_MAX,
    one_active: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every shared queue of a namespace with the arguments it is declared with: one place
    for the processes' declarations, the definitions export and ``doctor``'s expectations.
    ``one_active``: the queues the replicas consume take one consumer at a time
    (``ONE_ACTIVE_ARGUMENTS``); the dead-letter queue is an operator's, never consumed."""
    arguments = {
        names.requests_queue: quorum_arguments(names),
        names.dead_queue: dead_letter_arguments(dead_letter_max),
        names.reports_queue: quorum_arguments(names),
        names.heartbeats_queue: hint_arguments(cluster),
        names.signals_queue: hint_arguments(cluster),
    }
    if one_active:
        for queue in consumed_queues(names):
            arguments[queue] = {**arguments[queue], **ONE_ACTIVE_ARGUMENTS}
    return arguments


async def declare_topology(
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    names: Names,
    *,
    cluster: bool = False,
    dead_letter_max: int = DEAD_LETTER_MAX,
    one_active: bool = False,
) -> dict[str, AbstractExchange]:
    """Declare every exchange and shared queue of the public contract; the exchanges by role.
    ``cluster``: the broker is a cluster (see :func:`hint_arguments`); ``one_active``: see
    :data:`ONE_ACTIVE_ARGUMENTS`. A queue that holds runs (requests, the workers' requests)
    or dead letters and exists with other arguments is used as it is (``doctor`` says so;
    docs/operations.md, "Replicas: all active, or one"); a queue of hints is re-created."""
    arguments = shared_queue_arguments(
        names, cluster=cluster, dead_letter_max=dead_letter_max, one_active=one_active
    )
    bindings = run_queue_bindings(names)
    direct, topic, fanout = (
        aio_pika.ExchangeType.DIRECT,
        aio_pika.ExchangeType.TOPIC,
        aio_pika.ExchangeType.FANOUT,
    )
    dead = await channel.declare_exchange(names.dead_exchange, fanout, durable=True)
    dead_queue = await _declare_or_accept(
        connection, channel, names.dead_queue, arguments[names.dead_queue]
    )
    await dead_queue.bind(dead)
    requests = await channel.declare_exchange(names.requests_exchange, direct, durable=True)
    requests_queue = await _declare_or_accept(
        connection, channel, names.requests_queue, arguments[names.requests_queue]
    )
    for key in bindings[names.requests_queue][1]:
        await requests_queue.bind(requests, key)
    events = await channel.declare_exchange(names.events_exchange, topic, durable=True)
    machines = await channel.declare_exchange(names.machines_exchange, direct, durable=True)
    heartbeats = await channel.declare_exchange(names.heartbeats_exchange, fanout, durable=True)
    reports = await channel.declare_exchange(names.reports_exchange, direct, durable=True)
    reports_queue = await _declare_or_accept(
        connection, channel, names.reports_queue, arguments[names.reports_queue]
    )
    for key in bindings[names.reports_queue][1]:
        await reports_queue.bind(reports, key)
    # Heartbeats and signals are hints (a machine alive, a slot freed): one lost costs at most
    # the next heartbeat or the periodic re-sweep, so a queue declared otherwise (a classic
    # queue of an earlier single-node set-up, another ``active_replicas``) is re-created, and
    # on one node a classic queue's lower latency and cost win over a quorum's.
    await _replace_if_declared_otherwise(
        connection, names.heartbeats_queue, arguments[names.heartbeats_queue]
    )
    heartbeats_queue = await channel.declare_queue(
        names.heartbeats_queue, durable=True, arguments=arguments[names.heartbeats_queue]
    )
    await heartbeats_queue.bind(heartbeats)
    await _replace_if_declared_otherwise(
        connection, names.signals_queue, arguments[names.signals_queue]
    )
    signals = await channel.declare_queue(
        names.signals_queue, durable=True, arguments=arguments[names.signals_queue]
    )
    for key in (*(event_binding(e) for e in TERMINAL_EVENT_KEYS), "machine.#"):
        await signals.bind(events, key)
    return {
        "dead": dead,
        "requests": requests,
        "events": events,
        "machines": machines,
        "heartbeats": heartbeats,
        "reports": reports,
    }


async def close_channel(channel: AbstractChannel) -> None:
    """Close a channel for good, also one the broker closed (a refused declaration, a queue
    not found). aio-pika's robust channel reopens itself after a close it did not ask for:
    dropped instead of closed, each one stayed open on the connection. A replica retrying a
    refused declaration every second reached RabbitMQ's 2,047 channels per connection within
    minutes, and RabbitMQ then closed the connection (bench/README.md, "The whole run, every
    key on one line")."""
    with contextlib.suppress(Exception):
        await channel.close()


@contextlib.asynccontextmanager
async def channel_kept_if_done(
    connection: AbstractRobustConnection, **options: Any
) -> AsyncIterator[AbstractChannel]:
    """A new channel for a block that sets it up (declarations, a consumer): kept when the
    block completes, closed for good (``close_channel``) when it raises."""
    channel = await connection.channel(**options)
    try:
        yield channel
    except BaseException:
        await close_channel(channel)
        raise


async def _declare_or_accept(
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    name: str,
    arguments: dict[str, Any],
    probe: AbstractChannel | None = None,
) -> AbstractQueue:
    """Declare a shared queue; one that exists with other arguments (an operator declared it
    from other definitions) is used as it is, with a warning, instead of fought over: its
    messages are not ours to drop. ``python -m dispatcher doctor`` names the difference.
    The declaration is tried on ``probe`` (a refusal closes it), a channel opened for it when
    none is given; the queue comes back on ``channel``, or on ``probe`` when one was given."""
    own_probe = probe is None
    tried = await connection.channel() if probe is None else probe
    try:
        queue = await tried.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed as exc:
        log.warning("queue %s exists with other arguments; using it as it is: %s", name, exc)
        return await channel.declare_queue(name, passive=True)
    finally:
        if own_probe:
            await close_channel(tried)
    if own_probe:
        return await channel.declare_queue(name, durable=True, arguments=arguments)
    return queue


async def declare_replies_queue(
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    name: str,
    *,
    cluster: bool,
    probe: AbstractChannel | None = None,
) -> AbstractQueue:
    """A machine's replies queue, of the type the broker calls for (``replies_arguments``).
    One declared otherwise (by an earlier version, or before the broker became a cluster)
    holds only answers, and a worker asks again for an answer that does not come: on a
    cluster it is re-created as a quorum queue, on one node it is used as it is."""
    arguments = replies_arguments(cluster)
    if cluster:
        await _replace_if_declared_otherwise(connection, name, arguments)
        return await (probe or channel).declare_queue(name, durable=True, arguments=arguments)
    return await _declare_or_accept(connection, channel, name, arguments, probe)


EXCHANGE_ROLES = ("dead", "requests", "events", "machines", "heartbeats", "reports")


async def look_up_topology(channel: AbstractChannel, names: Names) -> dict[str, AbstractExchange]:
    """The contract's exchanges, declared passively: for a machine's worker, whose identity may
    configure nothing (they exist: the dispatcher declares them)."""
    exchanges = {}
    for role in EXCHANGE_ROLES:
        name = getattr(names, f"{role}_exchange")
        exchanges[role] = await channel.declare_exchange(name, passive=True)
    return exchanges


async def _replace_if_declared_otherwise(
    connection: AbstractRobustConnection, name: str, arguments: dict[str, Any]
) -> None:
    """Re-create a queue of hints that an earlier version declared with other arguments
    (RabbitMQ refuses the new declaration with PRECONDITION_FAILED otherwise). Only for
    queues whose messages may be lost: the heartbeats', signals' and replies queues."""
    probe = await connection.channel()
    try:
        await probe.declare_queue(name, durable=True, arguments=arguments)
    except ChannelPreconditionFailed:
        log.warning("queue %s was declared with other arguments; re-creating it", name)
        fresh = await connection.channel()
        try:
            await fresh.queue_delete(name)
        finally:
            await close_channel(fresh)
    finally:
        await close_channel(probe)


async def delete_namespace(url: str, names: Names, machine_ids: list[str]) -> None:
    """Delete the namespace's queues and exchanges (those of ``machine_ids`` included)."""
    queues = [
        names.requests_queue,
        names.dead_queue,
        names.heartbeats_queue,
        names.signals_queue,
        names.reports_queue,
        # Holding queues of a ``queues migrate`` cut short (adapters/amqp/migrate.py).
        *(names.holding_queue(q) for q in run_queue_bindings(names)),
        *(names.machine_queue(m) for m in machine_ids),
        *(names.machine_replies_queue(m) for m in machine_ids),
    ]
    exchanges = [
        names.requests_exchange,
        names.events_exchange,
        names.dead_exchange,
        names.machines_exchange,
        names.heartbeats_exchange,
        names.reports_exchange,
    ]
    connection = await connect_any(split_urls(url))
    async with connection:
        for queue in queues:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        for exchange in exchanges:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
