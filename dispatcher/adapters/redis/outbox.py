"""The outbox stream in Redis: what the scripts recorded and nobody has published yet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.names import Names
from dispatcher.usecases.results import OutboxMessage

# Entries kept in the poison stream (the oldest are trimmed).
POISON_MAXLEN = 10_000


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
        """Entries nobody published (their writer died): for the relay. Their age is measured
        with Redis's clock, the clock that made their ids. An entry that is not a message
        (a field missing) is set aside at once."""
        seconds, micros = await self.redis.time()
        cutoff_ms = int((seconds - age_s) * 1000 + micros // 1000)
        rows: Any = await self.redis.xrange(self.names.outbox, "-", f"{cutoff_ms}", count=count)
        messages: list[OutboxMessage] = []
        for entry_id, fields in rows:
            try:
                messages.append(
                    OutboxMessage(
                        text(entry_id), text(fields[b"k"]), text(fields[b"r"]), bytes(fields[b"b"])
                    )
                )
            except (KeyError, TypeError, UnicodeDecodeError) as exc:
                await self.set_aside(text(entry_id), fields, f"not a message: {exc!r}")
        return messages

    async def set_aside(self, entry_id: str, fields: Any, error: str) -> None:
        """Move one entry to the capped poison stream (with why) and out of the outbox."""
        kept = {k: v for k, v in dict(fields).items() if k in (b"k", b"r", b"b", "k", "r", "b")}
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.names.outbox_poison,
            {**kept, "id": entry_id, "error": error[:500]},
            maxlen=POISON_MAXLEN,
            approximate=True,
        )
        pipe.xdel(self.names.outbox, entry_id)
        await pipe.execute()

    async def poison_length(self) -> int:
        return int(await self.redis.xlen(self.names.outbox_poison))

    async def length(self) -> int:
        return int(await self.redis.xlen(self.names.outbox))
