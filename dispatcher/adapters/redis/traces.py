"""The trace of finished runs (``core.trace``) and the last forecast's outlooks, in Redis.

* ``<ns>:trace:<target>`` stream, one entry per run that left the queue system (field ``j``:
  the record's short JSON form). Bounded on every write: entries older than the trace retention
  go (``MINID``), and at most ``max_records`` stay (``MAXLEN``), oldest first.
* ``<ns>:traced`` set of the targets that have a trace.
* ``<ns>:machinechanges`` stream of ``MachineChange`` (a machine's worker came online or went
  silent, its sessions changed, maintenance on or off), with the same bounds.
* ``<ns>:outlook`` hash target -> ``{"a": at, "d": next deadline, "p": predicted misses}``,
  replaced whole by the forecast chore.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from dispatcher.adapters.redis.codec import text
from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.core.trace import MachineChange, TraceRecord
from dispatcher.names import Names
from dispatcher.usecases.ports import TargetOutlook

log = logging.getLogger(__name__)
READ_CHUNK = 1000


@store_adapter
class RedisTraces:
    """``TraceStore`` over Redis streams."""

    def __init__(
        self, redis: aioredis.Redis, names: Names, *, retention_s: float, max_records: int
    ) -> None:
        self.redis = redis
        self.names = names
        self.retention_s = retention_s
        self.max_records = max_records

    async def record(self, records: Sequence[TraceRecord]) -> None:
        """Append records (one round trip for the batch) and trim each stream they went to."""
        if not records:
            return
        oldest_ms = max(0, int((time.time() - self.retention_s) * 1000))
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            key = self.names.trace(record.target)
            pipe.xadd(key, {"j": json.dumps(record.to_dict(), separators=(",", ":"))})
        for target in sorted({record.target for record in records}):
            key = self.names.trace(target)
            pipe.xtrim(key, minid=oldest_ms, approximate=False)
            pipe.xtrim(key, maxlen=self.max_records, approximate=False)
            pipe.sadd(self.names.traced, target)
        await pipe.execute()

    async def record_changes(self, changes: Sequence[MachineChange]) -> None:
        """Append machine changes (one stream for the fleet, same bounds as a target's trace)."""
        if not changes:
            return
        oldest_ms = max(0, int((time.time() - self.retention_s) * 1000))
        key = self.names.machine_changes
        pipe = self.redis.pipeline(transaction=False)
        for change in changes:
            pipe.xadd(key, {"j": json.dumps(change.to_dict(), separators=(",", ":"))})
        pipe.xtrim(key, minid=oldest_ms, approximate=False)
        pipe.xtrim(key, maxlen=self.max_records, approximate=False)
        await pipe.execute()

    async def changes(self) -> list[MachineChange]:
        """Every recorded machine change, oldest first (entries that do not read are skipped)."""
        changes: list[MachineChange] = []
        start = "-"
        while True:
            rows: Any = await self.redis.xrange(
                self.names.machine_changes, min=start, count=READ_CHUNK
            )
            for entry_id, fields in rows:
                try:
                    raw = fields.get(b"j", fields.get("j"))
                    changes.append(MachineChange.from_dict(json.loads(raw)))
                except (ValueError, TypeError, AttributeError) as exc:
                    log.warning("skipping a machine change that does not read: %s", exc)
                start = f"({text(entry_id)}"
            if len(rows) < READ_CHUNK:
                return changes

    async def read(
        self, target: str, after: str = "-", limit: int | None = None
    ) -> tuple[list[TraceRecord], str]:
        """The target's records after stream id ``after`` (``-``: all), at most ``limit`` entries
        of them (None: every one), and the last id read."""
        records: list[TraceRecord] = []
        start = after if after == "-" else f"({after}"
        last = after
        left = limit
        while left is None or left > 0:
            count = READ_CHUNK if left is None else min(READ_CHUNK, left)
            rows: Any = await self.redis.xrange(self.names.trace(target), min=start, count=count)
            for entry_id, fields in rows:
                last = text(entry_id)
                try:
                    raw = fields.get(b"j", fields.get("j"))
                    records.append(TraceRecord.from_dict(json.loads(raw)))
                except (ValueError, TypeError, AttributeError) as exc:
                    log.warning("skipping a trace entry of %s that does not read: %s", target, exc)
            if len(rows) < count:
                break
            if left is not None:
                left -= len(rows)
            start = f"({last}"
        return records, last

    async def traced_targets(self) -> list[str]:
        return sorted(text(t) for t in await self.redis.smembers(self.names.traced))

    async def save_outlooks(self, outlooks: dict[str, TargetOutlook]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.names.outlook)
        if outlooks:
            pipe.hset(
                self.names.outlook,
                mapping={
                    target: json.dumps(
                        {"a": o.at, "d": o.next_deadline_at, "p": o.predicted_timeouts}
                    )
                    for target, o in outlooks.items()
                },
            )
        await pipe.execute()

    async def outlooks(self) -> dict[str, TargetOutlook]:
        raw: Any = await self.redis.hgetall(self.names.outlook)
        result: dict[str, TargetOutlook] = {}
        for target, value in raw.items():
            try:
                data = json.loads(value)
                deadline = data.get("d")
                result[text(target)] = TargetOutlook(
                    float(data["a"]),
                    float(deadline) if deadline is not None else None,
                    int(data["p"]),
                )
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("skipping an outlook of %s that does not read: %s", text(target), exc)
        return result
