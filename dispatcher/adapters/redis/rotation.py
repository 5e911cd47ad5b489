"""Re-encrypting the secrets at rest with the primary key (``secrets rotate``).

Two kinds of values are sealed with the :class:`~dispatcher.crypto.SecretBox`: a credentials
connection's ``password_sealed`` (in the connections hash, bound to the connection id) and a
sign-in connection's token cache (bound to :func:`cache_context`). Each one sealed with
another key than the primary is opened and sealed again, and written only if it did not
change meanwhile (compare-and-set in Lua): a token cache refreshed while the rotation runs is
never overwritten with its older content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from dispatcher.adapters.identity.token_store import cache_context
from dispatcher.adapters.redis.connection import store_call
from dispatcher.crypto import SecretBox
from dispatcher.errors import SealedDataError
from dispatcher.names import Names

# KEYS[1]: a string key or a hash; ARGV: field ('' for a string), expected, new value.
_CAS = """
local current
if ARGV[1] == '' then current = redis.call('GET', KEYS[1])
else current = redis.call('HGET', KEYS[1], ARGV[1]) end
if current ~= ARGV[2] then return 0 end
if ARGV[1] == '' then redis.call('SET', KEYS[1], ARGV[3])
else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
return 1
"""


@dataclass
class Rotation:
    """What a rotation found and did."""

    resealed: list[str] = field(default_factory=list)
    current: int = 0
    changed_meanwhile: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@store_call
async def reseal_all(
    redis: aioredis.Redis, names: Names, box: SecretBox, *, dry_run: bool = False
) -> Rotation:
    """Seal again with the primary key every secret at rest sealed with another one."""
    result = Rotation()
    cas = redis.register_script(_CAS)
    connections = await redis.hgetall(names.connections)
    for raw_id, raw in sorted(connections.items()):
        connection_id = _text(raw_id)
        data = json.loads(raw)
        sealed = data.get("password_sealed")
        if not sealed:
            continue
        label = f"connection {connection_id} password"
        if not box.needs_rotation(sealed):
            result.current += 1
            continue
        try:
            password = box.open_text(sealed, connection_id)
            data["password_sealed"] = box.seal_text(password, connection_id)
        except SealedDataError:
            result.unreadable.append(label)
            continue
        arguments = [connection_id, raw, json.dumps(data)]
        if dry_run or await cas(keys=[names.connections], args=arguments):
            result.resealed.append(label)
        else:
            result.changed_meanwhile.append(label)
    if result.resealed and not dry_run:
        await redis.incr(names.fleet_version)
    prefix = names.token_cache("")
    async for raw_key in redis.scan_iter(match=prefix + "*", count=500):
        key = _text(raw_key)
        connection_id = key.removeprefix(prefix)
        label = f"connection {connection_id} token cache"
        sealed_raw = await redis.get(key)
        if sealed_raw is None:
            continue
        sealed = _text(sealed_raw)
        if not box.needs_rotation(sealed):
            result.current += 1
            continue
        context = cache_context(connection_id)
        try:
            fresh = box.seal_text(box.open_text(sealed, context), context)
        except SealedDataError:
            result.unreadable.append(label)
            continue
        if dry_run or await cas(keys=[key], args=["", sealed, fresh]):
            result.resealed.append(label)
        else:
            result.changed_meanwhile.append(label)
    return result
