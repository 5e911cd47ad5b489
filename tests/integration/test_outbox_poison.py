"""One outbox entry that cannot be published (a routing key RabbitMQ cannot take, an entry
that is not a message) never wedges the relay: it is set aside in the capped poison stream and
the entries around it are published. Real Redis and RabbitMQ."""

from __future__ import annotations

import pytest

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.adapters.outbox import OutboxPublisher
from dispatcher.adapters.redis.connection import make_redis
from dispatcher.adapters.redis.outbox import RedisOutbox
from dispatcher.names import Names
from tests.support.processes import cleanup, new_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_a_poison_entry_is_set_aside_and_the_others_are_relayed() -> None:
    settings = new_settings()
    names = Names(settings.namespace)
    redis = make_redis(settings)
    amqp = Amqp(settings.amqp_url.get_secret_value(), names)
    outbox = RedisOutbox(redis, names)
    publisher = OutboxPublisher(amqp, outbox)
    try:
        await amqp.connect()
        stream = names.outbox
        await redis.xadd(stream, {"k": "event", "r": "run.queued", "b": b'{"run_id":"a"}'})
        await redis.xadd(stream, {"k": "assign", "r": "m" * 300, "b": b'{"run_id":"b"}'})
        await redis.xadd(stream, {"k": "event", "r": "run.queued"})  # no body
        await redis.xadd(stream, {"k": "event", "r": "run.queued", "b": b'{"run_id":"c"}'})
        assert await publisher.relay(0.0) == 2
        await publisher.aclose()  # the published entries are forgotten
        assert await outbox.length() == 0
        assert await outbox.poison_length() == 2
        poison = await redis.xrange(names.outbox_poison)
        assert {fields[b"error"][:10] for _, fields in poison} != set()
        # The relay is not wedged: a later entry goes out.
        await redis.xadd(stream, {"k": "event", "r": "run.queued", "b": b'{"run_id":"d"}'})
        assert await publisher.relay(0.0) == 1
    finally:
        await publisher.aclose()
        await amqp.close()
        await redis.aclose()
        await cleanup(settings)
