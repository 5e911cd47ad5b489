"""``doctor``'s ``rabbitmq.replicas`` from the consumers the management API lists (the real
API's answers are read in tests/chaos/test_one_active.py and tests/e2e/test_doctor.py)."""

from __future__ import annotations

from dispatcher.adapters.amqp.consumers import QueueConsumer
from dispatcher.tools.doctor import replicas_check

A, B = "rundispatch:ns:host-a:11", "rundispatch:ns:host-b:12"
QUEUES = ("ns.requests", "ns.reports", "ns.heartbeats", "ns.signals")


def everywhere(*consumers: QueueConsumer) -> dict[str, list[QueueConsumer]]:
    return {queue: list(consumers) for queue in QUEUES}


def test_no_consumer_on_a_queue_is_a_warning_naming_it() -> None:
    consumers = everywhere(QueueConsumer(A, True))
    consumers["ns.signals"] = []
    check = replicas_check(consumers, "all")
    assert check.status == "warn" and check.detail == "no replica consumes ns.signals"


def test_every_replica_consuming_is_listed() -> None:
    check = replicas_check(everywhere(QueueConsumer(A, True), QueueConsumer(B, True)), "all")
    assert (check.status, check.detail) == ("ok", f"2 consuming: {A}, {B}")


def test_one_active_names_the_active_replica_and_the_standby() -> None:
    check = replicas_check(everywhere(QueueConsumer(A, True), QueueConsumer(B, False)), "one")
    assert (check.status, check.detail) == ("ok", f"active: {A}; standing by: {B}")


def test_one_active_without_a_standby_is_a_warning() -> None:
    check = replicas_check(everywhere(QueueConsumer(A, True)), "one")
    assert check.status == "warn" and "standing by: none" in check.detail
    assert "second replica" in check.fix


def test_queues_active_on_different_replicas_are_listed_per_queue() -> None:
    consumers = everywhere(QueueConsumer(A, True), QueueConsumer(B, False))
    consumers["ns.reports"] = [QueueConsumer(A, False), QueueConsumer(B, True)]
    check = replicas_check(consumers, "one")
    assert check.status == "warn"
    assert f"ns.reports {B}" in check.detail and f"ns.requests {A}" in check.detail
    assert "restart all but one" in check.fix
