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
