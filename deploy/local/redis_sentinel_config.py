"""The configuration files of a local Redis Sentinel group: the data servers' (the product's
``deploy/redis/redis.conf`` plus ports, directories and a replication user) and the
Sentinels'. ``redis_sentinel.py`` starts the processes and breaks them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resp import HOST

REDIS_CONF = Path(__file__).resolve().parents[1] / "redis" / "redis.conf"
REPLICATION_USER = "replicator"


class SentinelGroupError(RuntimeError):
    """The group could not be started, reached or switched over; the message says why."""


@dataclass(frozen=True)
class Server:
    """One redis-server of the group (its role changes with failovers; its name does not)."""

    name: str  # redis-1 (the first primary), redis-2 (the first replica)
    port: int
    dir: str

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


def server_config(
    server: Server, password: str, extra: tuple[str, ...], replica_of: Server | None
) -> str:
    """A data server's configuration. Written once per server: Sentinel sends CONFIG REWRITE
    to the servers it reconfigures, which must rewrite this copy, never the repository's."""
    directory = Path(server.dir)
    overrides = [
        f"port {server.port}",
        f"bind {HOST}",
        f"dir {directory}",
        f"logfile {directory / 'redis.log'}",
        "daemonize no",
        # A full sync starts at once instead of waiting 5 s for more replicas to come.
        "repl-diskless-sync-delay 0",
        # The replica authenticates as its own user, so that lag_replica() can refuse it.
        f"user {REPLICATION_USER} on >{password} +psync +replconf +ping",
        f"masteruser {REPLICATION_USER}",
        f"masterauth {password}",
        *extra,
    ]
    if replica_of is not None:
        overrides.append(f"replicaof {HOST} {replica_of.port}")
    return REDIS_CONF.read_text() + "\n" + "\n".join(overrides) + "\n"


@dataclass(frozen=True)
class SentinelSettings:
    service: str
    quorum: int
    down_after_ms: int
    failover_timeout_ms: int


def sentinel_config(
    settings: SentinelSettings,
    *,
    directory: Path,
    port: int,
    ids: dict[int, str],
    primary: Server,
    replica: Server,
) -> str:
    """A Sentinel's configuration (``ids``: every Sentinel's port and id). It is told up front
    what it would otherwise learn from the primary's INFO (every 10 s) and from the other
    Sentinels' hello messages (every 2 s), so the group is ready in about a second."""
    name = settings.service
    lines = [
        f"port {port}",
        f"bind {HOST}",
        f"dir {directory}",
        f"logfile {directory / 'sentinel.log'}",
        f"sentinel myid {ids[port]}",
        f"sentinel monitor {name} {HOST} {primary.port} {settings.quorum}",
        f"sentinel down-after-milliseconds {name} {settings.down_after_ms}",
        f"sentinel failover-timeout {name} {settings.failover_timeout_ms}",
        f"sentinel parallel-syncs {name} 1",
        f"sentinel known-replica {name} {HOST} {replica.port}",
        *(
            f"sentinel known-sentinel {name} {HOST} {other_port} {other_id}"
            for other_port, other_id in ids.items()
            if other_port != port
        ),
    ]
    return "\n".join(lines) + "\n"
