"""Short leases in Redis so that one replica at a time performs a singleton chore."""

from __future__ import annotations

import redis.asyncio as aioredis

from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.names import Names

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""


@store_adapter
class RedisLeases:
    """Short leases so that one replica at a time performs a singleton chore."""

    def __init__(self, redis: aioredis.Redis, names: Names, owner: str) -> None:
        self.redis = redis
        self.names = names
        self.owner = owner
        self._renew = redis.register_script(_RENEW)

    async def hold(self, role: str, ttl_s: float) -> bool:
        """Take or renew the lease for ``role``; True while this replica holds it."""
        return bool(
            await self._renew(keys=[self.names.lease(role)], args=[self.owner, int(ttl_s * 1000)])
        )


# A pass begins when no other replica's pass over the target is under way (or the turn is
# already this replica's); otherwise it leaves word that it asked. The flag is cleared when a
# pass begins: that pass reads everything that was asked for before it.
_BEGIN = """
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
  return 1
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
"""

# A turn ends: kept (and the holder passes again) when another replica asked meanwhile, so
# that no request is lost between a skipped pass and the end of the one under way.
_END = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
redis.call('DEL', KEYS[1])
return 0
"""


@store_adapter
class RedisPassTurns:
    """Placement turns per target (``usecases.ports.PassTurns``)."""

    def __init__(self, redis: aioredis.Redis, names: Names, owner: str) -> None:
        self.names = names
        self.owner = owner
        self._begin = redis.register_script(_BEGIN)
        self._end = redis.register_script(_END)

    def _keys(self, target: str) -> list[str]:
        return [self.names.pass_turn(target), self.names.pass_again(target)]

    async def begin(self, target: str, ttl_s: float) -> bool:
        args: list[str | int] = [self.owner, int(ttl_s * 1000)]
        return bool(await self._begin(keys=self._keys(target), args=args))

    async def end(self, target: str, ttl_s: float) -> bool:
        args: list[str | int] = [self.owner, int(ttl_s * 1000)]
        return bool(await self._end(keys=self._keys(target), args=args))
