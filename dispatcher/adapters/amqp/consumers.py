"""Who consumes a namespace's shared queues, read from RabbitMQ's management API: with
``active_replicas=one``, which replica RabbitMQ delivers to and which ones stand by
(``doctor``).

A replica's connection is named ``rundispatch:<namespace>:<host>:<pid>``
(``connection_name``), so that an operator sees the process, not only its address.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from dispatcher.adapters.amqp.identities import checked, management_client
from dispatcher.errors import BrokerUnavailable


def connection_name(namespace: str) -> str:
    """The name this process gives its AMQP connection (shown by RabbitMQ)."""
    return f"rundispatch:{namespace}:{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class QueueConsumer:
    """One consumer of a queue: its connection's name (its address when the client gave it
    none) and whether RabbitMQ delivers to it (``False``: waiting, single active consumer)."""

    connection: str
    active: bool


async def read_consumers(
    admin_url: str, vhost: str, queues: list[str], timeout_s: float = 10.0
) -> dict[str, list[QueueConsumer]]:
    """The consumers of each of ``queues`` (none for a queue that does not exist).

    ``BrokerUnavailable`` when the API cannot be reached, ``ConfigurationError`` when it
    refuses the credentials of ``admin_url``."""
    escaped = quote(vhost, safe="")
    try:
        async with management_client(admin_url, timeout_s) as client:
            connections = checked(
                await client.get(
                    f"/api/vhosts/{escaped}/connections",
                    params={"columns": "name,client_properties"},
                )
            ).json()
            details: dict[str, list[dict[str, Any]]] = {}
            for queue in queues:
                response = await client.get(f"/api/queues/{escaped}/{quote(queue, safe='')}")
                found = response.status_code != 404
                details[queue] = (
                    checked(response).json().get("consumer_details", []) if found else []
                )
    except httpx.HTTPError as exc:
        raise BrokerUnavailable(
            f"the RabbitMQ management API cannot be reached ({type(exc).__name__})"
        ) from None
    named = {
        c["name"]: (c.get("client_properties") or {}).get("connection_name") or c["name"]
        for c in connections
    }
    return {
        queue: [
            QueueConsumer(connection=_connection_of(c, named), active=bool(c.get("active", True)))
            for c in of_queue
        ]
        for queue, of_queue in details.items()
    }


def _connection_of(consumer: dict[str, Any], named: dict[str, str]) -> str:
    """The name of a consumer's connection; ``?`` when the API no longer knows its channel
    (it then lists ``channel_details`` as an empty list, e.g. while a connection closes)."""
    channel = consumer.get("channel_details")
    address = channel.get("connection_name") if isinstance(channel, dict) else None
    if not isinstance(address, str):
        return "?"
    return named.get(address, address)
