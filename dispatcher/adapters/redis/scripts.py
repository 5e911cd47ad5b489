"""Running the Lua scripts of the run store: few round trips, and no lost scripts.

Every state change is one Lua script (``adapters/lua/*.lua``), so that it is atomic across
dispatcher replicas and workers. Two things keep their round trips down:

- calls of one script made in the same turn of the event loop (a batch of requests handled
  concurrently, say) share one pipeline (:meth:`ScriptRunner.run`);
- a batch of calls goes out as one pipeline of ``EVALSHA`` (:meth:`ScriptRunner.run_many`),
  without the ``SCRIPT EXISTS`` round trip redis-py's registered scripts make per pipeline. A
  server that lost its scripts (a restart) answers ``NOSCRIPT``: the script is loaded and those
  calls run again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from dispatcher.adapters.redis.codec import Call
from dispatcher.adapters.redis.connection import is_outage, outage_of

SCRIPTS = (
    "admit",
    "reject",
    "claim",
    "start",
    "adopt",
    "finish",
    "unqueue",
    "requeue",
    "reorder",
    "cancel",
)


def _common() -> str:
    return (resources.files("dispatcher.adapters") / "lua" / "common.lua").read_text()


# Appends a timeline entry (changed why-waiting reasons) to a run, no state changes; only
# while the run is still queued. The reasons are
# worked out before they are written, and meanwhile another replica may have timed the run out
# or placed it; a "waiting" after its "timed_out" would be a lie.
NOTE_SCRIPT = (
    _common()
    + "\nif redis.call('HGET', KEYS[1], 'status') ~= '\"queued\"' then return 0 end "
    + "append_timeline(KEYS[1], ARGV[1]) return 1"
)
TL_MAX_BYTES = 16384  # as in common.lua


def load_scripts() -> dict[str, str]:
    """The Lua sources, each prefixed with the shared helpers (``common.lua``)."""
    package = resources.files("dispatcher.adapters") / "lua"
    common = _common()
    return {name: common + "\n" + (package / f"{name}.lua").read_text() for name in SCRIPTS}


Pending = list[tuple[list[str], list[Any], "asyncio.Future[Any]"]]


class ScriptRunner:
    """Runs the store's scripts by name; see the module docstring."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.scripts = {
            name: redis.register_script(source) for name, source in load_scripts().items()
        }
        self._pending: dict[str, Pending] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def sha(self, name: str) -> str:
        """The script's SHA1 (what ``EVALSHA`` names it by)."""
        return str(self.scripts[name].sha)

    async def run(self, name: str, call: Call) -> Any:
        """One script call, pipelined with the calls of the same script made in this turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._pending.setdefault(name, [])
        pending.append((call[0], call[1], future))
        if len(pending) == 1:
            loop.call_soon(self._send_pending, name)
        return await future

    def _send_pending(self, name: str) -> None:
        calls = self._pending.pop(name, [])
        task = asyncio.create_task(self._send(name, calls))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, name: str, calls: Pending) -> None:
        try:
            raw = await self.run_many(name, [(keys, args) for keys, args, _ in calls])
        except BaseException as exc:
            for _, _, future in calls:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), item in zip(calls, raw, strict=True):
            if future.done():
                continue
            if isinstance(item, Exception):
                future.set_exception(item)
            else:
                future.set_result(item)

    async def run_many(self, name: str, calls: Sequence[Call]) -> list[Any]:
        """Several calls of one script in one pipeline (each atomic on its own). An item is the
        script's reply, or the exception of that one call."""
        if not calls:
            return []
        sha = self.sha(name)
        raw = await self._pipeline(sha, calls)
        missing = [i for i, item in enumerate(raw) if isinstance(item, NoScriptError)]
        if missing:
            await self.redis.script_load(self.scripts[name].script)
            again = await self._pipeline(sha, [calls[i] for i in missing])
            for index, item in zip(missing, again, strict=True):
                raw[index] = item
        # An outage reply (OOM, READONLY ...) is no answer about the item: the whole call is
        # an outage, so that the caller holds its work instead of failing items. A script
        # refused this way wrote nothing (Redis refuses before its first write).
        for item in raw:
            if isinstance(item, Exception) and is_outage(item):
                raise outage_of(item) from item
        return raw

    async def _pipeline(self, sha: str, calls: Sequence[Call]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
