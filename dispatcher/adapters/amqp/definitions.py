"""RabbitMQ definitions of a namespace, generated from :mod:`dispatcher.names` and the
topology the processes declare: exchanges, the shared queues with their types and
arguments, bindings, and the policies (delivery limit and dead-lettering of the work queues,
a length limit on the dead-letter queue).

Imported ahead of time (``rabbitmqctl import_definitions``, or ``load_definitions`` in
``rabbitmq.conf``), they make the topology an operator's artefact; the processes then find
it as they would declare it. Machine queues are declared by the processes as machines are
registered; the policy covers them by name.

Users and permissions are not generated here: a file written over an existing one keeps
its ``users``, ``permissions`` and ``topic_permissions``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dispatcher.adapters.amqp.topology import (
    DEAD_LETTER_MAX,
    DELIVERY_LIMIT,
    run_queue_bindings,
    shared_queue_arguments,
)
from dispatcher.names import TERMINAL_EVENT_KEYS, Names

TOPOLOGY_KEYS = ("vhosts", "policies", "queues", "exchanges", "bindings")
KEPT_KEYS = ("users", "permissions", "topic_permissions")


def topology_definitions(
    names: Names,
    vhost: str = "/",
    dead_letter_max: int = DEAD_LETTER_MAX,
    *,
    cluster: bool = False,
    one_active: bool = False,
) -> dict[str, Any]:
    """The namespace's exchanges, shared queues, bindings and policies, for ``vhost``, with
    the queues' arguments as the processes declare them (``shared_queue_arguments``: a
    cluster's hint queues, ``active_replicas=one``). The dead-letter queue's bound is both an
    argument and a policy (which also bounds a dead-letter queue declared before it had one)."""
    ns = re.escape(names.ns)

    def exchange(name: str, kind: str) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "type": kind,
            "durable": True,
            "auto_delete": False,
            "internal": False,
            "arguments": {},
        }

    def queue(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": arguments,
        }

    def binding(source: str, queue_name: str, key: str) -> dict[str, Any]:
        return {
            "source": source,
            "vhost": vhost,
            "destination": queue_name,
            "destination_type": "queue",
            "routing_key": key,
            "arguments": {},
        }

    bindings = [
        binding(names.dead_exchange, names.dead_queue, ""),
        *(
            binding(exchange, queue_name, key)
            for queue_name, (exchange, keys) in run_queue_bindings(names).items()
            for key in keys
        ),
        binding(names.heartbeats_exchange, names.heartbeats_queue, ""),
        *(
            binding(names.events_exchange, names.signals_queue, key)
            for key in (*TERMINAL_EVENT_KEYS, "machine.#")
        ),
    ]
    return {
        "vhosts": [{"name": vhost}],
        "policies": [
            {
                "vhost": vhost,
                "name": f"{names.ns}.work",
                # Not the replies queues: an answer nobody took expires, and is no dead letter.
                "pattern": rf"^{ns}\.(requests|reports|machine\.(?!.*\.replies$).+)$",
                "apply-to": "queues",  # 3.10 refuses "quorum_queues"
                "priority": 10,
                "definition": {
                    "delivery-limit": DELIVERY_LIMIT,
                    "dead-letter-exchange": names.dead_exchange,
                },
            },
            {
                "vhost": vhost,
                "name": f"{names.ns}.dead",
                "pattern": rf"^{re.escape(names.dead_queue)}$",
                "apply-to": "queues",
                "priority": 10,
                "definition": {"max-length": dead_letter_max, "overflow": "drop-head"},
            },
        ],
        "queues": [
            queue(name, arguments)
            for name, arguments in shared_queue_arguments(
                names, cluster=cluster, dead_letter_max=dead_letter_max, one_active=one_active
            ).items()
        ],
        "exchanges": [
            exchange(names.requests_exchange, "direct"),
            exchange(names.events_exchange, "topic"),
            exchange(names.machines_exchange, "direct"),
            exchange(names.heartbeats_exchange, "fanout"),
            exchange(names.reports_exchange, "direct"),
            exchange(names.dead_exchange, "fanout"),
        ],
        "bindings": bindings,
    }


def definitions_document(
    names: Names,
    vhost: str = "/",
    existing: dict[str, Any] | None = None,
    dead_letter_max: int = DEAD_LETTER_MAX,
    *,
    cluster: bool = False,
    one_active: bool = False,
) -> dict[str, Any]:
    """A whole definitions file: the topology, and the users and permissions of ``existing``."""
    document: dict[str, Any] = {key: list((existing or {}).get(key, [])) for key in KEPT_KEYS}
    topology = topology_definitions(
        names, vhost, dead_letter_max, cluster=cluster, one_active=one_active
    )
    document.update({"parameters": [], "global_parameters": []} | topology)
    return {key: document[key] for key in sorted(document)}


def write_definitions(
    path: Path,
    names: Names,
    vhost: str = "/",
    dead_letter_max: int = DEAD_LETTER_MAX,
    *,
    cluster: bool = False,
    one_active: bool = False,
) -> dict[str, Any]:
    """Write (or rewrite) a definitions file, keeping its users and permissions."""
    existing = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    document = definitions_document(
        names, vhost, existing, dead_letter_max, cluster=cluster, one_active=one_active
    )
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document
