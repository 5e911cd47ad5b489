"""What RabbitMQ holds of a namespace, read without changing anything (``doctor``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiormq.exceptions import AMQPError, ChannelNotFoundEntity, ChannelPreconditionFailed

from dispatcher.adapters.amqp.cluster import connect_any, split_urls
from dispatcher.adapters.amqp.topology import DEAD_LETTER_MAX, shared_queue_arguments
from dispatcher.errors import BrokerUnavailable
from dispatcher.names import Names


@dataclass
class BrokerReport:
    version: str = "?"
    missing: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    dead_letters: int = 0


def expected_exchanges(names: Names) -> list[str]:
    return [
        names.requests_exchange,
        names.events_exchange,
        names.machines_exchange,
        names.heartbeats_exchange,
        names.reports_exchange,
        names.dead_exchange,
    ]


async def inspect_namespace(
    url: str,
    names: Names,
    timeout_s: float = 5.0,
    dead_letter_max: int = DEAD_LETTER_MAX,
    *,
    cluster: bool = False,
    one_active: bool = False,
) -> BrokerReport:
    """The server's version, the namespace's missing exchanges and queues, the queues declared
    with other arguments than this configuration's processes declare them
    (``shared_queue_arguments``), and the dead letters waiting. ``BrokerUnavailable`` if
    unreachable."""
    expected = shared_queue_arguments(
        names, cluster=cluster, dead_letter_max=dead_letter_max, one_active=one_active
    )
    try:
        async with asyncio.timeout(timeout_s):
            connection = await connect_any(split_urls(url))  # a cluster's list: any node
    except (AMQPError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(f"RabbitMQ is unavailable: {type(exc).__name__}") from None
    report = BrokerReport()
    async with connection:
        transport = connection.transport
        properties = transport.connection.server_properties if transport else {}
        raw = properties.get("version", b"?") if properties else b"?"
        report.version = raw.decode() if isinstance(raw, bytes) else str(raw)
        for exchange in expected_exchanges(names):
            channel = await connection.channel()
            try:
                await channel.get_exchange(exchange, ensure=True)
            except ChannelNotFoundEntity:
                report.missing.append(f"exchange {exchange}")
            finally:
                if not channel.is_closed:
                    await channel.close()
        for queue, arguments in expected.items():
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
                if queue == names.dead_queue:
                    report.dead_letters = declared.declaration_result.message_count or 0
                # It exists: declaring it with the arguments we expect creates nothing and
                # fails only when it was declared otherwise.
                await channel.declare_queue(queue, durable=True, arguments=arguments)
            except ChannelNotFoundEntity:
                report.missing.append(f"queue {queue}")
            except ChannelPreconditionFailed as exc:
                report.differing.append(f"queue {queue} ({exc.args[0] if exc.args else exc})")
            finally:
                if not channel.is_closed:
                    await channel.close()
    return report
