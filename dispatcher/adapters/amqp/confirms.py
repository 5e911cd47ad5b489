"""Watching a publisher channel's confirms: one that RabbitMQ stops confirming is replaced.

On a cluster, a channel that published to a quorum queue while the queue's leader was being
elected (its node had just died) was seen (RabbitMQ 3.10) to have later publishes nacked or
never confirmed, while a new channel's publishes were confirmed at once (measured in
``tests/cluster/test_rabbitmq_cluster.py``: "channel first used during the election, nacked /
still nacked after it: True / True"). A nack is seen by the publish itself
(``broker.Amqp._publish``); a confirm that never comes is seen here, by looking at the
channel's oldest unconfirmed publish every ``interval_s``, not by a timer per publish (a timer
costs ~20 µs of CPU here, on every publish of every run). Replacing the channel fails the
publishes still waiting on it; their callers publish again (every consumer deduplicates).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractChannel

log = logging.getLogger(__name__)

# How long a publish may stay unconfirmed (between one and two looks) before its channel is
# replaced.
CONFIRM_TIMEOUT_S = 10.0


class ConfirmWatch:
    """Calls ``renew(channel)`` when the channel ``current()`` returns has had the same oldest
    publish unconfirmed at two looks in a row (``interval_s`` apart)."""

    def __init__(
        self,
        current: Callable[[], AbstractChannel | None],
        renew: Callable[[AbstractChannel], Awaitable[None]],
        interval_s: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        self.current = current
        self.renew = renew
        self.interval_s = interval_s
        self._previous: tuple[Any, int] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.look()

    async def look(self) -> bool:
        """One look; True when the channel was found stuck (and its renewal asked for)."""
        channel = self.current()
        oldest = await _oldest_unconfirmed(channel)
        if channel is None or oldest is None or not _same(oldest, self._previous):
            self._previous = oldest
            return False
        self._previous = None
        log.warning(
            "a publish has waited %.0f s or more for its confirm: replacing the publisher channel",
            self.interval_s,
        )
        try:
            await self.renew(channel)
        except Exception as exc:  # the connection is down: it reopens the channel itself
            log.warning("publisher channel not replaced: %r", exc)
        return True


async def _oldest_unconfirmed(channel: AbstractChannel | None) -> tuple[Any, int] | None:
    """The underlying channel and its oldest publish waiting for a confirm, if any."""
    if channel is None or channel.is_closed:
        return None
    try:
        underlay = await channel.get_underlay_channel()
    except Exception:  # not open (reconnecting)
        return None
    waiting = getattr(underlay, "confirmations", None) or {}
    return (underlay, min(waiting)) if waiting else None


def _same(now: tuple[Any, int], before: tuple[Any, int] | None) -> bool:
    return before is not None and now[0] is before[0] and now[1] == before[1]
