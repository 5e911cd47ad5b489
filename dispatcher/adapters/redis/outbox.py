"""The outbox stream in Redis: what the scripts recorded and nobody has published yet."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.names import Names
from dispatcher.usecases.results import OutboxMessage


@store_adapter
class RedisOutbox:
    """Entries of ``<ns>:outbox``: deleted once published, relayed when their writer died."""

    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names

    async def done(self, ids: Sequence[str]) -> None:
        """Forget published entries."""
        if ids:
            await self.redis.xdel(self.names.outbox, *ids)

    async def older_than(self, age_s: float, count: int) -> list[OutboxMessage]:
        """Entries nobody published (their writer died): for the relay."""
        cutoff_ms = int((time.time() - age_s) * 1000)
        rows: Any = await self.redis.xrange(self.names.outbox, "-", f"{cutoff_ms}", count=count)
        return [
            OutboxMessage(text(entry_id), text(f[b"k"]), text(f[b"r"]), bytes(f[b"b"]))
            for entry_id, f in rows
        ]

    async def length(self) -> int:
        return int(await self.redis.xlen(self.names.outbox))
