"""A Redis that is up but cannot serve (``OOM`` under ``noeviction``, ``READONLY`` on a
replica) is an outage of the store (``StoreUnavailable``), never a bad item: the consumer holds
such work instead of dead-lettering it. A private redis-server is broken here; the shared one
is never reconfigured."""

from __future__ import annotations

import pytest
import redis as sync_redis

from dispatcher.adapters.redis.connection import is_outage, make_redis
from dispatcher.adapters.redis.reads import RedisRunReads
from dispatcher.adapters.redis.transitions import RedisTransitions
from dispatcher.errors import StoreUnavailable
from dispatcher.models import ConnectionKind
from dispatcher.names import Names
from dispatcher.usecases.ports import Admission, retry_for
from tests.support.builders import request
from tests.support.privateredis import PrivateRedis, free_port
from tests.support.processes import new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def admission(run_id: str) -> Admission:
    now = 1_000.0
    return Admission(
        request(run_id=run_id), "m:m1", ConnectionKind.credentials, now, now + 60, 1000, 1000, now
    )


def admin(server: PrivateRedis) -> sync_redis.Redis:
    return sync_redis.Redis(host="127.0.0.1", port=server.port)


async def test_an_oom_reply_is_an_outage_and_the_run_is_not_failed(
    private_redis: PrivateRedis,
) -> None:
    settings = new_settings(redis_url=private_redis.url)
    names = Names(settings.namespace)
    client = admin(private_redis)
    client.config_set("maxmemory-policy", "noeviction")
    client.set("ballast", "x" * 2_000_000)
    client.config_set("maxmemory", str(int(client.info("memory")["used_memory"]) - 100_000))
    redis = make_redis(settings)
    transitions = RedisTransitions(redis, names, settings.retention_s)
    try:
        with pytest.raises(StoreUnavailable, match=r"OOM|memory") as refused:
            await transitions.admit(admission(run_id="oom-1"))
        assert retry_for(refused.value).outage  # held by the consumer, not dead-lettered
        # Nothing was written: the script was refused before its first write.
        assert await RedisRunReads(redis, names).get("oom-1") is None
        client.config_set("maxmemory", "0")
        again = await transitions.admit(admission(run_id="oom-1"))
        assert type(again).__name__ == "Queued"
    finally:
        client.close()
        await redis.aclose()


async def test_a_readonly_replica_is_an_outage(private_redis: PrivateRedis) -> None:
    settings = new_settings(redis_url=private_redis.url)
    names = Names(settings.namespace)
    client = admin(private_redis)
    client.replicaof("127.0.0.1", str(free_port()))  # a primary that is not there
    redis = make_redis(settings)
    transitions = RedisTransitions(redis, names, settings.retention_s)
    try:
        with pytest.raises(StoreUnavailable, match=r"READONLY|read only"):
            await transitions.admit(admission(run_id="ro-1"))
        with pytest.raises(StoreUnavailable):
            await transitions.forget_deadline("ro-1")  # a plain command, not a script
    finally:
        client.replicaof("NO", "ONE")
        client.close()
        await redis.aclose()


@pytest.mark.parametrize(
    "reply",
    [
        "NOREPLICAS Not enough good replicas to write.",
        "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
        "BUSY Redis is busy running a script.",
        "LOADING Redis is loading the dataset in memory",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
    ],
)
def test_outage_replies_are_recognised(reply: str) -> None:
    assert is_outage(sync_redis.ResponseError(reply))


def test_a_script_error_is_not_an_outage() -> None:
    assert not is_outage(sync_redis.ResponseError("ERR user_script:1: attempt to index nil"))
    assert not is_outage(sync_redis.ResponseError("BUSYGROUP Consumer Group name already exists"))
