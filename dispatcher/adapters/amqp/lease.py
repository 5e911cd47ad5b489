"""A lock held on the broker: an exclusive queue (a machine's lease, one live worker each).

RabbitMQ answers a second connection's declaration of an exclusive queue with RESOURCE_LOCKED
and deletes the queue when its connection closes, so the lock is freed by whatever ends the
holder: the process exiting, its host dying, RabbitMQ closing a connection that stopped
answering its heartbeats. Not an exclusive *consumer*: RabbitMQ 3.10 ignores ``exclusive`` on
quorum queues, and the queue lives on the node of its connection, so on a cluster it goes with
that node and is declared again from the next one.
"""

from __future__ import annotations

import logging
import time

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelAccessRefused, ChannelLockedResource

from dispatcher.adapters.amqp.topology import channel_kept_if_done
from dispatcher.errors import BrokerUnavailable, ConfigurationError, InExclusiveUse

log = logging.getLogger(__name__)


async def hold(
    connection: AbstractRobustConnection,
    queue: str,
    user: str,
    unreachable: tuple[type[BaseException], ...],
) -> AbstractChannel:
    """Declare ``queue`` exclusive to ``connection`` on a channel of its own (the robust
    channel declares it again after a reconnection); the channel to keep. ``InExclusiveUse``
    when another connection holds it."""
    try:
        async with channel_kept_if_done(connection, publisher_confirms=False) as channel:
            await channel.declare_queue(queue, exclusive=True, durable=False)
    except ChannelLockedResource as exc:
        raise InExclusiveUse(f"queue {queue} is held by another connection") from exc
    except ChannelAccessRefused as exc:  # an identity from before it could declare it
        raise ConfigurationError(
            f"this broker identity ({user}) may not declare {queue}: register the machine "
            "again (rundispatch machines register) to give it today's permissions"
        ) from exc
    except unreachable as exc:
        raise BrokerUnavailable(f"RabbitMQ is unavailable: {exc}") from exc
    return channel


class Refusals:
    """Since when a reconnection fails because another connection holds a lock of ours (the
    robust connection restores the exclusive queue, RabbitMQ answers RESOURCE_LOCKED and the
    connection closes, then tries again every few seconds)."""

    def __init__(self) -> None:
        self._since: float | None = None

    def on_close(self, _: object, exc: BaseException | None = None) -> None:
        if isinstance(exc, ChannelLockedResource) and self._since is None:
            log.warning("reconnected, but a lock of this connection is held elsewhere: %s", exc)
            self._since = time.monotonic()

    def on_reconnect(self, *_: object) -> None:
        self._since = None

    def refused_for(self) -> float:
        """Seconds since the refusals began; 0 while there are none."""
        return 0.0 if self._since is None else time.monotonic() - self._since
