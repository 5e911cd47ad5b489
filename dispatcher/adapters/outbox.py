"""Publishing what the store recorded in its outbox, and relaying what a dead process left.

The fast path: whoever made a state change publishes its messages at once (confirms awaited
as a window) and deletes them from the outbox. The relay: one replica at a time (a lease)
publishes entries older than a few seconds, whose writer died before it could. Consumers of
events and workers therefore see each message at least once; both dedupe.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Sequence

from dispatcher.adapters.amqp.broker import UNREACHABLE, Amqp
from dispatcher.adapters.redis.outbox import RedisOutbox
from dispatcher.errors import Unavailable
from dispatcher.metrics.hooks import MetricsHooks, NullMetrics
from dispatcher.names import event_of
from dispatcher.usecases.results import OutboxMessage

log = logging.getLogger(__name__)

FORGET_AFTER_S = 0.25  # long enough to delete many entries per round trip


class OutboxPublisher:
    """The ``Publisher`` port: RabbitMQ for publishing, the Redis outbox for forgetting."""

    def __init__(
        self, amqp: Amqp, outbox: RedisOutbox, metrics: MetricsHooks | None = None
    ) -> None:
        self.amqp = amqp
        self.outbox = outbox
        self.metrics: MetricsHooks = metrics or NullMetrics()
        self.published = 0
        self._confirmed: list[str] = []
        self._flusher: asyncio.Task[None] | None = None

    async def send(self, messages: Sequence[OutboxMessage]) -> bool:
        """Publish and forget ``messages``; on failure they stay for the relay."""
        if not messages:
            return True
        try:
            await self.amqp.publish_outbox(messages)
        except Exception as exc:
            log.warning("publish failed (%s); %d messages left to the relay", exc, len(messages))
            return False
        self.published += len(messages)
        events = collections.Counter(event_of(m.routing_key) for m in messages if m.kind == "event")
        for routing_key, count in events.items():
            self.metrics.event_published(routing_key, count)
        self._forget([m.id for m in messages if m.id])
        return True

    def _forget(self, ids: list[str]) -> None:
        """Delete confirmed entries from the outbox a moment later, many per round trip.

        Nothing waits for it: an entry left behind by a crash is published again by the
        relay, which consumers absorb (they see every message at least once anyway).
        """
        self._confirmed.extend(ids)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="outbox-flush")

    async def _flush(self, delay_s: float = FORGET_AFTER_S) -> None:
        await asyncio.sleep(delay_s)
        ids, self._confirmed = self._confirmed, []
        if not ids:
            return
        try:
            await self.outbox.done(ids)
        except Exception as exc:
            log.warning("could not clear %d outbox entries: %s", len(ids), exc)

    async def aclose(self) -> None:
        """Delete the confirmed entries now (at shutdown: none is left to a later relay, and
        no deletion runs after the store is closed)."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self._flush(0.0)

    async def relay(self, older_than_s: float, batch: int = 500) -> int:
        """Publish outbox entries older than ``older_than_s``; returns how many.

        When the batch fails, each entry is tried on its own. An entry that fails while the
        broker is there (others went out, or its error is not a connection failure: a routing
        key too long, a message RabbitMQ refuses) is set aside in the poison stream, so that
        one entry never wedges the relay; if the broker cannot be reached, all stay."""
        stale = await self.outbox.older_than(older_than_s, batch)
        if not stale:
            return 0
        if await self.send(stale):
            log.info("relayed %d outbox messages left by another process", len(stale))
            return len(stale)
        failed: list[tuple[OutboxMessage, Exception]] = []
        sent = 0
        for message in stale:
            try:
                await self.amqp.publish_outbox([message])
            except Exception as exc:
                failed.append((message, exc))
                continue
            sent += 1
            self._forget([message.id] if message.id else [])
        for message, error in failed:
            if sent or not isinstance(error, (*UNREACHABLE, Unavailable, asyncio.TimeoutError)):
                log.error(
                    "outbox entry %s (%s to %r) cannot be published: set aside (%s)",
                    message.id,
                    message.kind,
                    message.routing_key[:100],
                    type(error).__name__,
                )
                fields = {"k": message.kind, "r": message.routing_key, "b": message.body}
                await self.outbox.set_aside(message.id, fields, repr(error))
        return sent
