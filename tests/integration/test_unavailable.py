"""Adapters speak the error tree: a store or a broker that cannot be reached is
``StoreUnavailable`` / ``BrokerUnavailable`` (an ``Unavailable``), not a library exception."""

from __future__ import annotations

import socket

import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.adapters.redis.connection import make_redis
from dispatcher.adapters.redis.reads import RedisRunReads
from dispatcher.adapters.redis.transitions import RedisTransitions
from dispatcher.codes import ErrorCode
from dispatcher.errors import BrokerUnavailable, StoreUnavailable, Unavailable
from dispatcher.names import Names
from dispatcher.usecases.ports import Refusal, retry_for
from tests.support.builders import request
from tests.support.processes import new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_redis_is_store_unavailable() -> None:
    settings = new_settings(redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    redis = make_redis(settings)
    names = Names(settings.namespace)
    try:
        with pytest.raises(StoreUnavailable) as reads_failed:
            await RedisRunReads(redis, names).get("r1")
        refusal = Refusal(request(run_id="r1"), ErrorCode.ConnectionNotFound, "x", 1.0)
        with pytest.raises(StoreUnavailable):
            await RedisTransitions(redis, names, 60).reject(refusal)
    finally:
        await redis.aclose()
    assert retry_for(reads_failed.value).outage  # the consumer holds such a batch


async def test_an_unreachable_rabbitmq_is_broker_unavailable() -> None:
    amqp = Amqp(f"amqp://guest:guest@127.0.0.1:{closed_port()}/", Names("unreachable"))
    with pytest.raises(BrokerUnavailable) as failed:
        await amqp.connect()
    assert isinstance(failed.value, Unavailable)
    await amqp.close()
