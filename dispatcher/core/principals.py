"""Who may do what on the broker: each principal's RabbitMQ identity and its narrowest
permissions, and the definitions file that provisions them (SPEC "Trust: who may do what").

Pure: names in, permissions out. The management API adapter
(``adapters/amqp/identities.py``) applies them; ``broker definitions`` writes them for operators
who provision RabbitMQ themselves. The dispatcher itself is the broker's admin identity
(``RUNDISPATCH_AMQP_URL``); the operators' CLI, which changes the store, uses its settings.

- a **machine** reads only its own queues (assignments, and the dispatcher's replies) and
  publishes only its heartbeats, its reports (fenced starts, outcomes, queries) and what it
  dead-letters; it configures only its lease (an exclusive queue nothing is bound to: its
  other queues are declared and bound when it is registered), so it cannot bind another
  machine's assignments to a queue of its own;
- a **submitter** publishes only to the requests exchange, declares, binds and reads only queues
  named ``<ns>.submitter.<name>.*``, and reads only the events of its own runs: the topic
  permission on the events exchange lets it bind only routing keys naming itself;
- an **operator** (a person or a tool watching the system) reads every run's events and the
  dead-letter queue, declares and reads only queues named ``<ns>.operator.<name>.*``, and
  publishes only to the requests exchange, where the dispatcher takes its cancels of any run and
  refuses its run requests (an operator acts for no owner). It cannot publish to machines,
  events or heartbeats, nor read any machine's or the dispatcher's queues.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from dispatcher.errors import ConfigurationError
from dispatcher.names import NO_SUBMITTER, Names

SUBMITTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")
NOTHING = "^$"
DELIVERY_LIMIT = 5
# A machine's replies queue: answers nobody waits for any more expire.
REPLIES_ARGUMENTS: dict[str, Any] = {"x-message-ttl": 60_000}


def replies_arguments(cluster: bool) -> dict[str, Any]:
    """A machine's replies queue. On a cluster a quorum queue: a classic queue lives on one
    node, and when that node dies its worker's fenced starts and outcomes get no answer (the
    queue cannot even be declared again elsewhere while its node is down). On one node a
    classic queue: a quorum queue survives nothing more there, and would cost a replicated
    log write for every answer on the hot path of every run."""
    return {**REPLIES_ARGUMENTS, "x-queue-type": "quorum"} if cluster else dict(REPLIES_ARGUMENTS)


@dataclass(frozen=True)
class Permissions:
    """RabbitMQ's three regular expressions over resource names, for one virtual host."""

    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class TopicPermission:
    """Regular expressions over the routing keys of one topic exchange (``read``: the binding
    keys a principal may bind with; ``write``: the keys it may publish with)."""

    exchange: str
    write: str
    read: str


@dataclass(frozen=True)
class Principal:
    """A broker identity and what it may do."""

    kind: str  # "machine" | "submitter" | "operator"
    name: str
    username: str
    permissions: Permissions
    topic_permissions: tuple[TopicPermission, ...] = ()


@dataclass(frozen=True)
class Sender:
    """Who published a message, from its broker-validated ``user_id``: ``admin`` (the
    dispatcher's own identity, which the operators' CLI uses too), a ``machine``, a
    ``submitter`` or an ``operator`` (with its name), or ``unknown`` (no user id, or no
    principal of this namespace)."""

    kind: str
    name: str = ""

    def speaks_for_machine(self, machine_id: str) -> bool:
        return self.kind == "admin" or (self.kind == "machine" and self.name == machine_id)

    def acts_for(self, owner: str, submitters: Mapping[str, frozenset[str]]) -> bool:
        """Whether it may submit or cancel runs requested by ``owner``."""
        if self.kind == "admin":
            return True
        return self.kind == "submitter" and owner.casefold() in submitters.get(self.name, ())

    def may_cancel(self, owner: str, submitters: Mapping[str, frozenset[str]]) -> bool:
        """Whether it may cancel a run requested by ``owner``: who may submit it, and any
        operator (stopping runs is an operator's job; submitting them is not)."""
        return self.kind == "operator" or self.acts_for(owner, submitters)

    @property
    def routing_word(self) -> str:
        """The last word of the routing keys of the events of runs it submits."""
        return self.name if self.kind == "submitter" else NO_SUBMITTER

    def describe(self, user_id: str | None) -> str:
        return f"{self.kind} {self.name}" if self.name else (user_id or "a sender without user id")


def admin_user_of(amqp_url: str) -> str:
    """The user name of the dispatcher's broker identity (RabbitMQ's default: guest)."""
    return unquote(urlsplit(amqp_url.split(",", maxsplit=1)[0].strip()).username or "guest")


# A message the dispatcher held through an outage is published again by the dispatcher's own
# connection, and RabbitMQ lets a connection set no user_id but its own: the copy carries the
# admin's user_id and, in this header, the user who published the message first ("" for none).
HELD_FOR_HEADER = "x-rundispatch-held-for"


def publisher_of(
    admin_user: str, user_id: str | None, headers: Mapping[str, Any] | None
) -> str | None:
    """The user who first published a delivery. ``HELD_FOR_HEADER`` is believed only on a
    message the admin identity published (RabbitMQ validated its ``user_id``): anyone else
    naming another publisher in it is still classified by its own ``user_id``."""
    if user_id != admin_user or not headers or HELD_FOR_HEADER not in headers:
        return user_id
    held_for = headers[HELD_FOR_HEADER]
    if isinstance(held_for, bytes):
        held_for = held_for.decode("utf-8", "replace")
    return held_for if isinstance(held_for, str) and held_for else None


def sender_of(names: Names, admin_user: str, user_id: str | None) -> Sender:
    """Classify a delivery's ``user_id`` (RabbitMQ checked it is the publisher's user)."""
    if not user_id:
        return Sender("unknown")
    if user_id == admin_user:
        return Sender("admin")
    for kind, prefix in (
        ("machine", names.machine_user("")),
        ("submitter", names.submitter_user("")),
        ("operator", names.operator_user("")),
    ):
        if user_id.startswith(prefix) and len(user_id) > len(prefix):
            return Sender(kind, user_id[len(prefix) :])
    return Sender("unknown")


def _exactly(*resources: str) -> str:
    return "^(" + "|".join(re.escape(r) for r in resources) + ")$"


def machine_principal(names: Names, machine_id: str) -> Principal:
    """A machine: read its queues, publish heartbeats and reports, configure only its lease."""
    return Principal(
        kind="machine",
        name=machine_id,
        username=names.machine_user(machine_id),
        permissions=Permissions(
            configure=_exactly(names.machine_lease_queue(machine_id)),
            write=_exactly(names.heartbeats_exchange, names.reports_exchange, names.dead_exchange),
            read=_exactly(names.machine_queue(machine_id), names.machine_replies_queue(machine_id)),
        ),
    )


def _checked_name(kind: str, name: str) -> str:
    if not SUBMITTER_NAME.match(name):
        raise ConfigurationError(
            f"{kind} name {name!r} must match {SUBMITTER_NAME.pattern} "
            "(it is part of queue names and routing keys)"
        )
    return name


def _requests_principal(
    kind: str,
    name: str,
    names: Names,
    *,
    username: str,
    queue_prefix: str,
    readable: tuple[str, ...],
    events_read: str,
) -> Principal:
    """A principal that publishes on the requests exchange, uses only its own queues
    (``queue_prefix`` then anything), reads ``readable`` and the events exchange, and receives
    the events whose routing keys match ``events_read`` (a topic permission)."""
    own_queues = re.escape(queue_prefix) + ".+"
    resources = "|".join(re.escape(r) for r in (names.events_exchange, *readable))
    return Principal(
        kind=kind,
        name=name,
        username=username,
        permissions=Permissions(
            configure=f"^{own_queues}$",
            write=f"^({re.escape(names.requests_exchange)}|{own_queues})$",
            read=f"^({resources}|{own_queues})$",
        ),
        topic_permissions=(
            TopicPermission(exchange=names.events_exchange, write=NOTHING, read=events_read),
        ),
    )


def submitter_principal(names: Names, submitter: str) -> Principal:
    """A submitter: publish requests, use its own queues, bind only its own runs' events."""
    return _requests_principal(
        "submitter",
        _checked_name("submitter", submitter),
        names,
        username=names.submitter_user(submitter),
        queue_prefix=names.submitter_queue_prefix(submitter),
        readable=(),
        events_read=event_binding_pattern(submitter),
    )


def operator_principal(names: Names, operator: str) -> Principal:
    """An operator: read every run's events and the dead letters, use its own queues, publish
    requests (the dispatcher takes only its cancels)."""
    return _requests_principal(
        "operator",
        _checked_name("operator", operator),
        names,
        username=names.operator_user(operator),
        queue_prefix=names.operator_queue_prefix(operator),
        readable=(names.dead_queue,),
        events_read=".*",
    )


def event_binding_pattern(submitter: str) -> str:
    """The binding keys a submitter may use on the events exchange: ``run.<status>.<name>``
    (one status or ``*``), so that it receives only the events of its own runs."""
    return r"^run\.([a-z_]+|\*)\." + re.escape(submitter) + "$"


def definitions(
    names: Names,
    vhost: str,
    principals: Iterable[Principal],
    password_hashes: Mapping[str, str],
    *,
    cluster: bool = False,
    machine_queue_type: str = "quorum",
) -> dict[str, Any]:
    """A RabbitMQ definitions document (``rabbitmqctl import_definitions`` or the management
    API's ``POST /api/definitions``) with the principals' users, permissions and topic
    permissions, and each machine's queue bound to the machines exchange. ``password_hashes``
    maps a username to its ``rabbit_password_hashing_sha256`` hash; ``cluster``: the broker is
    a cluster (see :func:`replies_arguments`)."""
    users, permissions, topic_permissions, queues, bindings = [], [], [], [], []
    for principal in principals:
        users.append(
            {
                "name": principal.username,
                "password_hash": password_hashes[principal.username],
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
        )
        allowed = principal.permissions
        permissions.append(
            {
                "user": principal.username,
                "vhost": vhost,
                "configure": allowed.configure,
                "write": allowed.write,
                "read": allowed.read,
            }
        )
        for topic in principal.topic_permissions:
            topic_permissions.append(
                {
                    "user": principal.username,
                    "vhost": vhost,
                    "exchange": topic.exchange,
                    "write": topic.write,
                    "read": topic.read,
                }
            )
        if principal.kind == "machine":
            machine_id = principal.name
            for queue, key, arguments in (
                (
                    names.machine_queue(machine_id),
                    machine_id,
                    machine_queue_arguments(names, machine_queue_type),
                ),
                (
                    names.machine_replies_queue(machine_id),
                    names.replies_key(machine_id),
                    replies_arguments(cluster),
                ),
            ):
                queues.append(
                    {
                        "name": queue,
                        "vhost": vhost,
                        "durable": True,
                        "auto_delete": False,
                        "arguments": arguments,
                    }
                )
                bindings.append(
                    {
                        "source": names.machines_exchange,
                        "vhost": vhost,
                        "destination": queue,
                        "destination_type": "queue",
                        "routing_key": key,
                        "arguments": {},
                    }
                )
    return {
        "vhosts": [{"name": vhost}],
        "users": users,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "exchanges": [
            {
                "name": names.machines_exchange,
                "vhost": vhost,
                "type": "direct",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
        ],
        "queues": queues,
        "bindings": bindings,
    }


def machine_queue_arguments(names: Names, queue_type: str = "quorum") -> dict[str, Any]:
    """A machine's assignment queue: quorum (``quorum_arguments``) or durable classic,
    dead-lettering to the namespace's dead exchange either way. A classic queue has no
    delivery limit: an assignment a worker never gets to start is redelivered until the
    unstarted-run sweep gives the run to another fence, which the worker then refuses."""
    if queue_type == "classic":
        return {"x-queue-type": "classic", "x-dead-letter-exchange": names.dead_exchange}
    return quorum_arguments(names)


def quorum_arguments(names: Names) -> dict[str, Any]:
    """A quorum queue with a delivery limit, dead-lettering to the namespace's dead exchange
    (the requests queue and every machine queue)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": names.dead_exchange,
    }
