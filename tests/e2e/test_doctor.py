"""``python -m dispatcher doctor`` against real services: a private Redis configured as the
deployment's (AOF, noeviction) and then misconfigured, the real RabbitMQ with the test's
namespace declared, then with a queue declared otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aio_pika
import pytest
import redis

from dispatcher.adapters.amqp.inspect import inspect_namespace
from dispatcher.client import Client
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.privateredis import PrivateRedis, free_port
from tests.support.processes import REPO, Processes, eventually, new_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def settings(private_redis: PrivateRedis) -> Settings:
    return new_settings(redis_url=private_redis.url)


def doctor(procs: Processes, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    environment = dict(procs.env)
    environment.update(env or {})
    run = [sys.executable, "-m", "dispatcher", "doctor"]
    text = subprocess.run(run, cwd=REPO, env=environment, capture_output=True, text=True)
    assert "Traceback" not in text.stdout + text.stderr, text.stderr
    result = subprocess.run(
        [*run, "--json"], cwd=REPO, env=environment, capture_output=True, text=True
    )
    assert result.returncode == text.returncode, (text.stdout, result.stdout)
    checks = {c["name"]: c for c in json.loads(result.stdout)}
    return result.returncode, checks, text.stdout


async def test_a_healthy_deployment_passes(
    client: Client, settings: Settings, procs: Processes
) -> None:
    assert doctor(procs)[1]["rabbitmq.replicas"]["status"] == "warn"  # no dispatcher yet
    procs.dispatcher()
    await eventually(
        lambda: doctor(procs)[1]["rabbitmq.replicas"]["status"] == "ok", timeout=60, interval=0.5
    )
    code, checks, text = doctor(procs)
    assert code == 0, text
    for name in ("redis.aof", "redis.eviction", "clock", "rabbitmq.topology", "redis.version",
                 "rabbitmq.files", "rabbitmq.replicas"):  # fmt: skip
        assert checks[name]["status"] == "ok", checks[name]
    pid = procs.procs["dispatcher"].pid
    assert checks["rabbitmq.replicas"]["detail"].endswith(f":{pid}"), checks["rabbitmq.replicas"]
    assert checks["identities.secret_keys"]["status"] == "ok"
    assert checks["identities.broker_user"]["status"] == "warn"  # the tests' guest user
    assert "0 problems" in text


async def test_problems_are_named_with_their_fix_and_fail_the_exit_code(
    client: Client, settings: Settings, procs: Processes, private_redis: PrivateRedis
) -> None:
    store = redis.Redis(host="127.0.0.1", port=private_redis.port)
    store.config_set("appendonly", "no")
    store.config_set("maxmemory-policy", "allkeys-lru")
    store.close()
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(names.signals_queue)
        await channel.declare_queue(names.signals_queue, durable=True)  # no message TTL
    code, checks, text = doctor(procs)
    assert code == 1
    assert checks["redis.aof"]["status"] == "FAIL"
    assert "appendonly yes" in checks["redis.aof"]["fix"]
    assert checks["redis.eviction"]["status"] == "FAIL"
    assert "allkeys-lru" in checks["redis.eviction"]["detail"]
    topology = checks["rabbitmq.topology"]
    assert topology["status"] == "warn" and names.signals_queue in topology["detail"]
    assert "fix: set 'maxmemory-policy noeviction'" in text


async def test_a_dead_letter_queue_near_its_bound_fails(
    client: Client, settings: Settings, procs: Processes
) -> None:
    names = Names(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        dead = await channel.get_exchange(names.dead_exchange)
        for index in range(4):
            await dead.publish(aio_pika.Message(f"dead-{index}".encode()), routing_key="")
    _, checks, _ = doctor(procs)
    assert checks["rabbitmq.dead_letters"]["status"] == "warn"  # 4 of 100,000
    code, checks, _ = doctor(procs, {"RUNDISPATCH_DEAD_LETTER_MAX": "4"})
    assert code == 1
    dead_letters = checks["rabbitmq.dead_letters"]
    assert dead_letters["status"] == "FAIL"
    assert "100% of its bound of 4" in dead_letters["detail"]
    assert "the oldest are dropped" in dead_letters["fix"]


def test_unreachable_services_are_failures_not_tracebacks(procs: Processes) -> None:
    env = {
        "RUNDISPATCH_REDIS_URL": f"redis://:pw-one@127.0.0.1:{free_port()}/0",
        "RUNDISPATCH_AMQP_URL": f"amqp://guest:pw-two@127.0.0.1:{free_port()}/",
        "RUNDISPATCH_SECRET_KEYS": "",
    }
    code, checks, text = doctor(procs, env)
    assert code == 1
    assert checks["redis"]["status"] == "FAIL" and "RUNDISPATCH_REDIS_URL" in checks["redis"]["fix"]
    assert checks["rabbitmq"]["status"] == "FAIL"
    assert checks["identities.secret_keys"]["status"] == "FAIL"
    assert "pw-one" not in text and "pw-two" not in text


async def test_the_topology_of_a_cluster_s_url_list_is_read_from_a_node_that_answers(
    client: Client, settings: Settings
) -> None:
    """``RUNDISPATCH_AMQP_URL`` lists a cluster's nodes: the first one down, the second up
    (this broker): the namespace is read from the second (it was 'unavailable' before)."""
    url = settings.amqp_url.get_secret_value()
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    report = await inspect_namespace(f"{down},{url}", Names(settings.namespace))
    assert report.version != "?" and not report.missing and not report.differing
