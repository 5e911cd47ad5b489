"""Principals, pure: each identity's permissions, the definitions document, and who sent a
message."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from dispatcher.core.principals import (
    HELD_FOR_HEADER,
    admin_user_of,
    definitions,
    event_binding_pattern,
    machine_principal,
    operator_principal,
    publisher_of,
    sender_of,
    submitter_principal,
)
from dispatcher.crypto import rabbit_password_hash
from dispatcher.errors import ConfigurationError
from dispatcher.names import Names

pytestmark = pytest.mark.unit

NAMES = Names("prod")


def matches(pattern: str, resource: str) -> bool:
    return re.search(pattern, resource) is not None


def test_a_machine_reads_only_its_queue_and_writes_only_heartbeats() -> None:
    allowed = machine_principal(NAMES, "m1.fin").permissions
    # It configures only its lease: not its own queues, nor another machine's lease.
    assert matches(allowed.configure, "prod.machine.m1.fin.lease")
    for other in ("prod.machine.m1.fin", "prod.machine.m1.fin.replies", "prod.machine.m1.lease",
                  "prod.machine.m1xfin.lease", "prod.machine.m1.fin.leasex"):  # fmt: skip
        assert not matches(allowed.configure, other), other
    assert matches(allowed.read, "prod.machine.m1.fin")
    assert matches(allowed.read, "prod.machine.m1.fin.replies")
    for other in ("prod.machine.m1", "prod.machine.m1.fin2", "prod.machine.m1xfin", "prod.events",
                  "prod.machine.m1.replies", "prod.reports"):  # fmt: skip
        assert not matches(allowed.read, other), other
    for own in ("prod.heartbeats", "prod.reports", "prod.dead"):
        assert matches(allowed.write, own), own
    for other in ("prod.requests", "prod.machines", "prod.events", "prod.heartbeatsX"):
        assert not matches(allowed.write, other), other


def test_a_submitter_uses_only_its_queues_the_requests_and_its_runs_events() -> None:
    principal = submitter_principal(NAMES, "env1")
    allowed = principal.permissions
    assert principal.username == "prod.submitter.env1"
    assert matches(allowed.configure, "prod.submitter.env1.events")
    for other in ("prod.submitter.env10.events", "prod.submitter.env1.", "prod.machine.m1"):
        assert not matches(allowed.configure, other), other
    assert matches(allowed.write, "prod.requests") and not matches(allowed.write, "prod.machines")
    assert matches(allowed.read, "prod.events") and not matches(allowed.read, "prod.machine.m1")
    [topic] = principal.topic_permissions
    assert (topic.exchange, topic.write) == ("prod.events", "^$")
    for key in ("run.*.env1", "run.succeeded.env1", "run.timed_out.env1"):
        assert matches(topic.read, key), key
    for key in ("run.#", "#", "run.*.env2", "run.*.env10", "run.*.*", "run.succeeded.#"):
        assert not matches(topic.read, key), key
    assert topic.read == event_binding_pattern("env1")


@pytest.mark.parametrize("name", ["", "a.b", "-x", "x y", "a" * 65])
def test_a_submitter_name_is_one_routing_word(name: str) -> None:
    with pytest.raises(ConfigurationError):
        submitter_principal(NAMES, name)
    with pytest.raises(ConfigurationError, match="operator name"):
        operator_principal(NAMES, name)


def test_an_operator_watches_every_run_and_the_dead_letters_and_publishes_only_requests() -> None:
    principal = operator_principal(NAMES, "ops1")
    allowed = principal.permissions
    assert (principal.kind, principal.username) == ("operator", "prod.operator.ops1")
    assert matches(allowed.configure, "prod.operator.ops1.events")
    for other in ("prod.operator.ops10.events", "prod.operator.ops1.", "prod.events",
                  "prod.machine.m1", "prod.dead", "prod.requests"):  # fmt: skip
        assert not matches(allowed.configure, other), other
    for own in ("prod.events", "prod.dead", "prod.operator.ops1.watch"):
        assert matches(allowed.read, own), own
    for other in ("prod.machine.m1", "prod.machine.m1.replies", "prod.requests", "prod.reports",
                  "prod.heartbeats", "prod.signals", "prod.operator.ops2.watch",
                  "prod.submitter.env1.events"):  # fmt: skip
        assert not matches(allowed.read, other), other
    assert matches(allowed.write, "prod.requests")
    for other in ("prod.machines", "prod.events", "prod.heartbeats", "prod.reports", "prod.dead"):
        assert not matches(allowed.write, other), other
    [topic] = principal.topic_permissions
    assert (topic.exchange, topic.write) == ("prod.events", "^$")
    for key in ("run.#", "#", "run.*.env1", "machine.#"):
        assert matches(topic.read, key), key


def test_the_definitions_document_provisions_users_permissions_and_machine_queues() -> None:
    machine, submitter = machine_principal(NAMES, "m1"), submitter_principal(NAMES, "env1")
    hashes = {p.username: rabbit_password_hash("pw") for p in (machine, submitter)}
    document = definitions(NAMES, "/", [machine, submitter], hashes)
    assert [u["name"] for u in document["users"]] == ["prod.machine.m1", "prod.submitter.env1"]
    assert all(u["tags"] == [] for u in document["users"])  # no management access
    assert [p["read"] for p in document["permissions"]] == [
        machine.permissions.read,
        submitter.permissions.read,
    ]
    assert [t["user"] for t in document["topic_permissions"]] == ["prod.submitter.env1"]
    queue, replies = document["queues"]
    assert (queue["name"], replies["name"]) == ("prod.machine.m1", "prod.machine.m1.replies")
    assert queue["arguments"]["x-queue-type"] == "quorum"
    assert [(b["source"], b["routing_key"]) for b in document["bindings"]] == [
        ("prod.machines", "m1"),
        ("prod.machines", "m1.replies"),
    ]
    assert "pw" not in str(document)


def test_a_replies_queue_is_a_quorum_queue_on_a_cluster_and_classic_on_one_node() -> None:
    """On a cluster a classic replies queue would die with its node, and its worker's starts
    and outcomes would get no answer; on one node a quorum queue survives nothing more."""
    machine = machine_principal(NAMES, "m1")
    hashes = {machine.username: rabbit_password_hash("pw")}
    for cluster, kind in ((True, "quorum"), (False, None)):
        _, replies = definitions(NAMES, "/", [machine], hashes, cluster=cluster)["queues"]
        assert replies["arguments"].get("x-queue-type") == kind
        assert replies["arguments"]["x-message-ttl"] == 60_000  # unanswered answers expire


def test_a_password_hash_is_rabbitmq_s_salted_sha256() -> None:
    raw = base64.b64decode(rabbit_password_hash("s3cret"))
    salt, digest = raw[:4], raw[4:]
    assert digest == hashlib.sha256(salt + b"s3cret").digest()
    assert rabbit_password_hash("s3cret") != rabbit_password_hash("s3cret")  # salted


def test_a_held_copy_names_its_first_publisher_only_when_the_admin_published_it() -> None:
    admin, m1 = "dispatcher/prod", "prod.machine.m1"
    assert publisher_of(admin, m1, None) == m1
    assert publisher_of(admin, admin, {}) == admin  # the admin's own message
    assert publisher_of(admin, admin, {HELD_FOR_HEADER: m1}) == m1
    assert publisher_of(admin, admin, {HELD_FOR_HEADER: m1.encode()}) == m1
    assert publisher_of(admin, admin, {HELD_FOR_HEADER: ""}) is None  # first sent without one
    assert publisher_of(admin, admin, {HELD_FOR_HEADER: 7}) is None
    # Anyone else's header is ignored: RabbitMQ validated only the user_id.
    assert publisher_of(admin, m1, {HELD_FOR_HEADER: admin}) == m1
    assert publisher_of(admin, None, {HELD_FOR_HEADER: admin}) is None


def test_who_sent_a_message_comes_from_its_user_id() -> None:
    admin = admin_user_of("amqp://dispatcher%2Fprod:pw@rabbit:5672/")
    assert admin == "dispatcher/prod"
    assert admin_user_of("amqp://rabbit/") == "guest"
    classify = [
        (user, sender_of(NAMES, admin, user))
        for user in ("dispatcher/prod", "prod.machine.m1", "prod.submitter.env1",
                     "other.machine.m1", "prod.machine.", None, "", "prod.operator.ops1")
    ]  # fmt: skip
    assert [(s.kind, s.name) for _, s in classify] == [
        ("admin", ""),
        ("machine", "m1"),
        ("submitter", "env1"),
        ("unknown", ""),
        ("unknown", ""),
        ("unknown", ""),
        ("unknown", ""),
        ("operator", "ops1"),
    ]
    submitters = {"env1": frozenset({"alice@contoso.com"})}
    machine, submitter = classify[1][1], classify[2][1]
    assert machine.speaks_for_machine("m1") and not machine.speaks_for_machine("m2")
    assert not submitter.speaks_for_machine("m1")
    assert submitter.acts_for("Alice@Contoso.com", submitters)
    assert not submitter.acts_for("bob@contoso.com", submitters)
    assert not machine.acts_for("alice@contoso.com", submitters)
    assert classify[0][1].acts_for("anyone", {}) and classify[0][1].speaks_for_machine("m9")
    assert (submitter.routing_word, machine.routing_word) == ("env1", "-")
    # An operator cancels any run, submits none, speaks for no machine.
    operator = classify[-1][1]
    assert operator.may_cancel("bob@contoso.com", submitters)
    assert not operator.acts_for("alice@contoso.com", submitters)
    assert not operator.speaks_for_machine("m1") and operator.routing_word == "-"
    assert submitter.may_cancel("alice@contoso.com", submitters)
    assert not submitter.may_cancel("bob@contoso.com", submitters)
    assert not machine.may_cancel("alice@contoso.com", submitters)
