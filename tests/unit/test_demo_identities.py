"""The demo gives each worker only its machine's identity: no Redis, no vault key, no
identity provider secret, and not the operator's broker URL."""

from __future__ import annotations

from pathlib import Path

from devtools.demo import Demo
from devtools.demo_fleet import MACHINES, OWNERS, fleet, sessions


def test_a_demo_worker_gets_its_machine_s_identity_and_nothing_of_the_operator_s(
    tmp_path: Path,
) -> None:
    demo = Demo(tmp_path, keep=False)
    demo.env = {
        "PATH": "/usr/bin",
        "RUNDISPATCH_AMQP_URL": "amqp://admin:admin-password@127.0.0.1:5672/",
        "RUNDISPATCH_REDIS_URL": "redis://127.0.0.1:6379/0",
        "RUNDISPATCH_SECRET_KEYS": "demo:a2V5",
        "RUNDISPATCH_CLIENT_SECRET": "client-secret",
        "RUNDISPATCH_NAMESPACE": "demo1234",
        "RUNDISPATCH_HEARTBEAT_INTERVAL_S": "1",
    }
    demo.identities = {"fin-01": "amqp://demo1234.machine.fin-01:pw1@127.0.0.1:5672/"}

    env = demo.worker_env("fin-01")

    assert env == {
        "PATH": "/usr/bin",
        "RUNDISPATCH_AMQP_URL": "amqp://demo1234.machine.fin-01:pw1@127.0.0.1:5672/",
        "RUNDISPATCH_NAMESPACE": "demo1234",
        "RUNDISPATCH_HEARTBEAT_INTERVAL_S": "1",
    }
    assert demo.env["RUNDISPATCH_AMQP_URL"].startswith("amqp://admin:")  # left as it was


def test_the_submitter_acts_for_every_owner_of_the_example_fleet() -> None:
    owners = {c["owner"] for c in fleet("t")["connections"]}
    assert owners == set(OWNERS)
    assert (
        set(sessions(carol="locked"))
        == set(MACHINES)
        == {m["machine_id"] for m in fleet("t")["machines"]}
    )
