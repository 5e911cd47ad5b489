"""One clock for every deadline: Redis's (``TIME``).

Queue deadlines, run deadlines and the outbox's stream ids are compared across processes on
different hosts; their clocks may disagree by minutes. A dispatcher reads Redis's clock now and
then and keeps its offset from the host clock, so that its ``clock()`` is Redis's time without
a round trip per reading. Scripts that set a deadline from a worker's report use ``TIME``
themselves (``start.lua``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis

from dispatcher.adapters.redis.connection import store_call

log = logging.getLogger(__name__)

SYNC_EVERY_S = 30.0


class StoreClock:
    """Redis's time, as host time plus the offset measured at the last :meth:`sync`."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s

    @store_call
    async def sync(self) -> float:
        """Measure the offset (half the round trip is taken as the reply's age)."""
        before = time.time()
        seconds, micros = await self.redis.time()
        after = time.time()
        self.offset_s = seconds + micros / 1e6 - (before + after) / 2
        return self.offset_s

    async def keep_in_sync(self, every_s: float = SYNC_EVERY_S) -> None:
        """Re-measure the offset forever (a host clock may be stepped or drift)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                offset = await self.sync()
            except Exception as exc:
                log.warning("clock offset not refreshed: %s", exc)
                continue
            if abs(offset) > 1.0:
                log.warning("this host's clock is %.1f s off Redis's", -offset)
