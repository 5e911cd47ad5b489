"""The fleet in Redis: environment, groups, machines, connections, and a cached snapshot.

Every change bumps a version counter; processes keep their snapshot until it moves, so a
decision costs one small read, not a reload of a thousand machines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import redis.asyncio as aioredis

from dispatcher.adapters.redis.connection import store_adapter
from dispatcher.core.fleet import FleetSnapshot
from dispatcher.errors import NotFound
from dispatcher.models import Connection, Environment, Group, Machine, Submitter
from dispatcher.names import Names


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@store_adapter
class RedisFleet:
    """Reads and writes the fleet configuration."""

    def __init__(self, redis: aioredis.Redis, names: Names) -> None:
        self.redis = redis
        self.names = names
        self._snapshot: FleetSnapshot | None = None

    async def apply(
        self,
        environment: Environment,
        groups: Sequence[Group],
        machines: Sequence[Machine],
        connections: Sequence[Connection],
        prune: bool = False,
        *,
        submitters: Sequence[Submitter] = (),
    ) -> dict[str, int]:
        """Create or update everything given (in one transaction); with ``prune``, delete
        groups, machines and connections that are not given."""
        names = self.names
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(names.environment, environment.model_dump_json())
        removed = 0
        if prune:
            current = await self.load(force=True)
            for key, keep, have in (
                (names.groups, {g.group_id for g in groups}, current.groups),
                (names.machines, {m.machine_id for m in machines}, current.machines),
                (names.connections, {c.connection_id for c in connections}, current.connections),
                (names.submitters, {s.name for s in submitters}, current.submitters),
            ):
                stale = [item for item in have if item not in keep]
                if stale:
                    pipe.hdel(key, *stale)
                    removed += len(stale)
        for group in groups:
            pipe.hset(names.groups, group.group_id, group.model_dump_json())
        for machine in machines:
            pipe.hset(names.machines, machine.machine_id, machine.model_dump_json())
        for connection in connections:
            pipe.hset(names.connections, connection.connection_id, connection.model_dump_json())
        for submitter in submitters:
            pipe.hset(names.submitters, submitter.name, json.dumps(list(submitter.acts_for)))
        pipe.incr(names.fleet_version)
        await pipe.execute()
        return {
            "submitters": len(submitters),
            "groups": len(groups),
            "machines": len(machines),
            "connections": len(connections),
            "removed": removed,
        }

    async def version(self) -> int:
        return int(await self.redis.get(self.names.fleet_version) or 0)

    async def load(self, force: bool = False) -> FleetSnapshot:
        """The current snapshot; reloaded only when the version moved."""
        version = await self.version()
        if not force and self._snapshot is not None and self._snapshot.version == version:
            return self._snapshot
        names = self.names
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(names.environment)
        pipe.hgetall(names.groups)
        pipe.hgetall(names.machines)
        pipe.hgetall(names.connections)
        pipe.get(names.fleet_version)
        pipe.hgetall(names.submitters)
        (
            env_raw,
            groups_raw,
            machines_raw,
            connections_raw,
            version_raw,
            submitters_raw,
        ) = await pipe.execute()
        snapshot = FleetSnapshot.build(
            environment=Environment.model_validate_json(env_raw) if env_raw else None,
            groups={_text(k): Group.model_validate_json(v) for k, v in groups_raw.items()},
            machines={_text(k): Machine.model_validate_json(v) for k, v in machines_raw.items()},
            connections={
                _text(k): Connection.model_validate_json(v) for k, v in connections_raw.items()
            },
            version=int(version_raw or 0),
            submitters={
                _text(k): frozenset(o.casefold() for o in json.loads(v))
                for k, v in submitters_raw.items()
            },
        )
        self._snapshot = snapshot
        return snapshot

    async def put_submitter(self, name: str, acts_for: Sequence[str]) -> None:
        """Record (or replace) the owners a registered submitter may act for; every process
        reloads its snapshot."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.names.submitters, name, json.dumps(list(acts_for)))
        pipe.incr(self.names.fleet_version)
        await pipe.execute()

    async def remove_submitter(self, name: str) -> bool:
        """Forget a submitter; False when there was none of that name."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.names.submitters, name)
        pipe.incr(self.names.fleet_version)
        removed, _ = await pipe.execute()
        return bool(removed)

    def cached(self) -> FleetSnapshot | None:
        return self._snapshot

    async def set_maintenance(self, machine_id: str, on: bool) -> Machine:
        """Turn a machine's maintenance mode on or off."""
        raw = await self.redis.hget(self.names.machines, machine_id)
        if raw is None:
            raise NotFound(f"machine {machine_id!r} does not exist")
        machine = Machine.model_validate_json(raw).model_copy(update={"maintenance": on})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.names.machines, machine_id, machine.model_dump_json())
        pipe.incr(self.names.fleet_version)
        await pipe.execute()
        return machine
