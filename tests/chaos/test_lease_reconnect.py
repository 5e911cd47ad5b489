"""A machine's lease across a cut connection (an exclusive queue the worker declares):
the worker's connection takes it again when it comes back; if another connection took it
meanwhile, the worker's link says the lease is lost once ``lease_wait_s`` has passed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.errors import InExclusiveUse
from dispatcher.names import Names
from dispatcher.settings import Settings
from tests.support.faultproxy import FaultProxy
from tests.support.processes import cleanup, eventually, new_settings
from workers.adapters.amqp_link import AmqpLink

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(90)]

DIRECT = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    fault_proxy = FaultProxy("127.0.0.1", 5672)
    await fault_proxy.start()
    yield fault_proxy
    await fault_proxy.stop()


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    settings = new_settings()
    yield settings
    await cleanup(settings, ["m1"])


async def take(names: Names) -> Amqp:
    """Another worker's connection holding m1's lease."""
    other = Amqp(DIRECT, names)
    await other.connect()
    try:
        await other.hold_exclusive_queue(names.machine_lease_queue("m1"))
    except BaseException:
        await other.close()
        raise
    return other


async def test_the_lease_is_taken_again_after_a_reconnection(
    proxy: FaultProxy, settings: Settings
) -> None:
    names = Names(settings.namespace)
    holder = Amqp(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", names)
    await holder.connect()
    await holder.ensure_machine_queue("m1")
    link = AmqpLink(machine_id="m1", worker_id="w1", names=names, broker=holder)
    try:
        await link.lease()
        with pytest.raises(InExclusiveUse):
            await take(names)
        assert proxy.reset_all() >= 1
        # Back on a new connection, the holder has its exclusive consumer again, so a second
        # worker is still refused.
        await eventually(lambda: proxy.open_connections >= 1 and holder.is_connected(), 30)
        await eventually(lambda: _held(names), timeout=30)
        with pytest.raises(InExclusiveUse):
            await take(names)
        assert holder.exclusive_refused_for() == 0
    finally:
        await link.aclose()
        await holder.close()


async def test_a_lease_taken_elsewhere_during_a_disconnection_is_reported_lost(
    proxy: FaultProxy, settings: Settings
) -> None:
    names = Names(settings.namespace)
    holder = Amqp(f"amqp://guest:guest@127.0.0.1:{proxy.port}/", names)
    await holder.connect()
    await holder.ensure_machine_queue("m1")
    link = AmqpLink(
        machine_id="m1",
        worker_id="w1",
        names=names,
        broker=holder,
        refused_for=holder.exclusive_refused_for,
        lease_wait_s=0.5,
    )
    other: Amqp | None = None
    try:
        await link.lease()
        proxy.refuse = True
        proxy.reset_all()
        other = await eventually(lambda: _take_when_free(names), timeout=30)
        proxy.refuse = False  # the holder reconnects, and is refused its lease back
        reason = await asyncio.wait_for(link.lease_lost(), timeout=60)
        assert "another worker took machine m1's lease" in reason
        # The other worker goes away: the holder's connection comes back with the lease.
        await other.close()
        other = None
        await eventually(lambda: holder.exclusive_refused_for() == 0, timeout=30)
        await eventually(lambda: _held(names), timeout=30)
    finally:
        if other is not None:
            await other.close()
        await link.aclose()
        await holder.close()


async def _take_when_free(names: Names) -> Amqp | None:
    try:
        return await take(names)
    except InExclusiveUse:
        return None


async def _held(names: Names) -> bool:
    """Whether m1's lease is held, as RabbitMQ sees it: a passive declaration of the lease
    queue from another connection is RESOURCE_LOCKED while a connection holds it."""
    probe = Amqp(DIRECT, names)
    await probe.connect()
    try:
        channel = await probe.connection.channel()  # type: ignore[union-attr]
        await channel.declare_queue(names.machine_lease_queue("m1"), passive=True)
        return False  # declared, but by nobody exclusively: not a lease
    except ChannelLockedResource:
        return True
    except ChannelNotFoundEntity:
        return False
    finally:
        await probe.close()
