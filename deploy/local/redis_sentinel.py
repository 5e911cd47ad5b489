#!/usr/bin/env python3
"""A local Redis primary, one replica and three Sentinels, on free ports under a temporary dir.

    python3 deploy/local/redis_sentinel.py up     [--service NAME] [--dir DIR]
    python3 deploy/local/redis_sentinel.py status [--dir DIR]
    python3 deploy/local/redis_sentinel.py down   [--dir DIR]

From Python::

    with RedisSentinelGroup() as group:
        group.sentinel_addresses        # [("127.0.0.1", port), ...] for redis-py's Sentinel
        group.primary()                 # the data server the Sentinels call primary
        group.lag_replica()             # from now on the replica receives nothing
        group.kill(group.primary())     # SIGKILL: the Sentinels promote the (stale) replica
        group.wait_for_new_primary(old) # ... and say which one it is now
        group.failover()                # SENTINEL FAILOVER (a planned switch)

Both data servers run ``deploy/redis/redis.conf`` (the product's configuration: AOF, fsync
every second, ``noeviction``) with only ports, directories and replication settings added.
Nothing here touches another Redis on the host.

**Making acknowledged writes really lost.** Replication is asynchronous, so a failover loses
whatever the replica had not received. To make that window as wide as a test needs, and
certain, ``lag_replica`` cuts the replica off at the primary: the replica authenticates to its
primary as a dedicated ACL user (``masteruser``), and the cut disables that user and closes its
replication connection. The primary goes on acknowledging writes (``WAIT 1`` answers 0); the
replica, still healthy and answering the Sentinels, retries the link and is refused. Kill the
primary then, and the Sentinels promote a replica that never saw those writes; when the old
primary comes back it is made a replica of the new one and drops them too.

Why not simply SIGSTOP the replica (or ``DEBUG SLEEP`` it): its kernel keeps receiving the
replication stream into the socket buffers (several MB on loopback) while the process is
stopped, so after SIGCONT the replica applies everything that fit, and small write loads are
*not* lost. The cut has no such limit. Its one constraint: Sentinel skips a replica whose link
has been down longer than ``10 x down-after-milliseconds`` (plus the time the primary has been
down), so kill the primary within that window of the cut (10 s with ``down_after_ms=1000``).

Standard library only (``resp.py`` talks to Redis), like ``services.py``.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localprocs import ProcessGroup, command_line, free_port, wait_until
from redis_sentinel_config import (
    REPLICATION_USER,
    SentinelGroupError,
    SentinelSettings,
    Server,
    sentinel_config,
    server_config,
)
from resp import HOST, RespError, answers, command, info, pairs

DEFAULT_DIR = Path(tempfile.gettempdir()) / "rundispatch-redis-sentinel"


def _wait(condition: Any, timeout_s: float, message: str) -> None:
    wait_until(
        condition, timeout_s, lambda: SentinelGroupError(message), ignore=(OSError, RespError)
    )


class RedisSentinelGroup:
    """Start, inspect, break and stop a primary, a replica and ``sentinels`` Sentinels.

    ``down_after_ms``: how long a primary must not answer before a Sentinel counts it down
    (``down-after-milliseconds``); failover follows within about a second or two after that.
    ``server_config``: directives added to both data servers' configuration (e.g.
    ``min-replicas-to-write 1``). ``workdir`` must be empty; ``stop`` deletes it.
    """

    def __init__(
        self,
        *,
        service: str = "rundispatch",
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 10_000,
        server_config: tuple[str, ...] = (),
        workdir: Path | None = None,
    ) -> None:
        self.redis_server = shutil.which("redis-server") or ""
        if not self.redis_server:
            raise SentinelGroupError(
                "redis-server is missing: install Redis 7 (Debian/Ubuntu: "
                "apt-get install -y redis-server)"
            )
        self.settings = SentinelSettings(service, quorum, down_after_ms, failover_timeout_ms)
        self.server_config = server_config
        self.processes = ProcessGroup(workdir, "rundispatch-sentinel-")
        self.dir = self.processes.dir
        self.servers: list[Server] = []
        self.sentinel_ports: list[int] = []
        self._sentinel_count = sentinels
        self._password = secrets.token_hex(16)  # the replication user's
        self.boot_s = 0.0

    def __enter__(self) -> RedisSentinelGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start both data servers and the Sentinels; return once the replica is in sync and
        every Sentinel knows the replica and the other Sentinels (a failover can happen)."""
        try:
            self.processes.claim_dir()
        except RuntimeError as exc:
            raise SentinelGroupError(str(exc)) from None
        began = time.monotonic()
        try:
            self.servers = [
                Server(f"redis-{i}", free_port(), str(self.dir / f"redis-{i}")) for i in (1, 2)
            ]
            primary, replica = self.servers
            self._spawn_server(primary)
            self._spawn_server(replica, replica_of=primary)
            self.sentinel_ports = [free_port() for _ in range(self._sentinel_count)]
            ids = {port: secrets.token_hex(20) for port in self.sentinel_ports}
            for port in self.sentinel_ports:
                self._spawn_sentinel(port, ids, primary, replica)
            self._wait_ready(primary, replica, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.boot_s = time.monotonic() - began
        self._save_state()

    def stop(self) -> None:
        """Kill every process of the group and delete its directory."""
        self.processes.stop_all()

    # -- addresses and roles ---------------------------------------------------------------

    @property
    def service(self) -> str:
        return self.settings.service

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, port) for port in self.sentinel_ports]

    def server(self, name_or_port: str | int) -> Server:
        for server in self.servers:
            if name_or_port in (server.name, server.port):
                return server
        raise KeyError(f"no server {name_or_port!r}")

    def primary(self) -> Server:
        """The data server most Sentinels name as the primary."""
        votes: dict[int, int] = {}
        for port in self.sentinel_ports:
            with contextlib.suppress(OSError, RespError):
                _, primary_port = command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                votes[int(primary_port)] = votes.get(int(primary_port), 0) + 1
        if not votes:
            raise SentinelGroupError("no Sentinel answered")
        return self.server(max(votes, key=lambda p: votes[p]))

    def replica(self) -> Server:
        """The data server that is not the primary."""
        primary = self.primary()
        return next(s for s in self.servers if s != primary)

    def role(self, server: Server) -> str:
        """What the server itself says it is: ``master`` or ``slave``."""
        return info(server.port)["role"]

    def is_running(self, server: Server) -> bool:
        return self.processes.running(server.name)

    # -- faults ----------------------------------------------------------------------------

    def wait_in_sync(self, timeout_s: float = 30.0) -> float:
        """Wait until the replica is linked to the primary and has every write it acknowledged
        so far (after a start, a failover or ``resume_replica``). Returns the seconds waited."""
        began = time.monotonic()

        def in_sync() -> bool:
            primary, replica = self.primary(), self.replica()
            state = info(replica.port)
            if state.get("master_link_status") != "up":
                return False
            if int(state.get("master_port", -1)) != primary.port:
                return False
            wanted = int(info(primary.port)["master_repl_offset"])
            return int(info(replica.port)["slave_repl_offset"]) >= wanted

        _wait(in_sync, timeout_s, "the replica did not catch up with the primary")
        return time.monotonic() - began

    def lag_replica(self) -> int:
        """Cut the replica off: from now on it receives nothing, and the primary goes on
        acknowledging writes. Returns the primary's replication offset at the cut (the
        replica holds everything before it: call ``wait_in_sync`` first if in doubt)."""
        primary, replica = self.primary(), self.replica()
        if info(replica.port).get("master_link_status") != "up":
            raise SentinelGroupError("the replica is not linked to the primary: wait_in_sync()")
        command(primary.port, "ACL", "SETUSER", REPLICATION_USER, "off")
        command(primary.port, "CLIENT", "KILL", "USER", REPLICATION_USER)
        offset = int(info(primary.port)["master_repl_offset"])
        _wait(
            lambda: info(replica.port).get("master_link_status") != "up",
            5,
            "the replica is still linked after the cut",
        )
        return offset

    def resume_replica(self) -> None:
        """Let the replica catch up again (undo ``lag_replica``). On every running server: the
        one cut off may have been demoted since, and Sentinel's CONFIG REWRITE keeps the ACL."""
        for server in self.servers:
            if self.is_running(server):
                command(server.port, "ACL", "SETUSER", REPLICATION_USER, "on")

    def freeze(self, server: Server) -> None:
        """SIGSTOP a server: it keeps its sockets, and its kernel keeps receiving for it."""
        self.processes.procs[server.name].send_signal(signal.SIGSTOP)

    def thaw(self, server: Server) -> None:
        self.processes.procs[server.name].send_signal(signal.SIGCONT)

    def kill(self, server: Server) -> None:
        """SIGKILL a data server (a crash; the AOF keeps what reached the page cache)."""
        self.processes.kill(server.name)
        self._save_state()

    def restart(self, server: Server, timeout_s: float = 20.0) -> None:
        """Start a killed data server again on its port and directory. The Sentinels turn a
        former primary into a replica of the current one (within ~10 s: their INFO period)."""
        if self.is_running(server):
            raise SentinelGroupError(f"{server.name} is running")
        self._spawn_server(server)
        self._save_state()
        _wait(lambda: answers(server.port), timeout_s, f"{server.name} did not restart")

    def failover(self, timeout_s: float = 30.0) -> tuple[Server, float]:
        """``SENTINEL FAILOVER``: promote the replica on purpose. Returns the new primary and
        the seconds until the Sentinels and the server itself agreed on it."""
        old = self.primary()
        command(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.service)
        return self.wait_for_new_primary(old, timeout_s)

    def wait_for_new_primary(self, old: Server, timeout_s: float = 30.0) -> tuple[Server, float]:
        """Wait until every Sentinel names another primary than ``old`` and that server says
        it is a master. Returns it and the seconds waited."""
        began = time.monotonic()

        def switched() -> bool:
            named = {
                int(command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])
                for port in self.sentinel_ports
            }
            if len(named) != 1 or old.port in named:
                return False
            return info(named.pop())["role"] == "master"

        _wait(switched, timeout_s, f"no new primary within {timeout_s:.0f} s")
        return self.primary(), time.monotonic() - began

    # -- internals -------------------------------------------------------------------------

    def _spawn_server(self, server: Server, replica_of: Server | None = None) -> None:
        config = Path(server.dir) / "redis.conf"
        if not config.exists():
            Path(server.dir).mkdir(parents=True, exist_ok=True)
            text = server_config(server, self._password, self.server_config, replica_of)
            config.write_text(text)
        self.processes.spawn(server.name, [self.redis_server, str(config)], cwd=Path(server.dir))

    def _spawn_sentinel(
        self, port: int, ids: dict[int, str], primary: Server, replica: Server
    ) -> None:
        index = self.sentinel_ports.index(port) + 1
        directory = self.dir / f"sentinel-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"  # Sentinel rewrites it: it must be its own file
        config.write_text(
            sentinel_config(
                self.settings,
                directory=directory,
                port=port,
                ids=ids,
                primary=primary,
                replica=replica,
            )
        )
        # redis-server in Sentinel mode: Debian's redis-sentinel package is not needed.
        argv = [self.redis_server, str(config), "--sentinel"]
        self.processes.spawn(f"sentinel-{index}", argv, cwd=directory)

    def _wait_ready(self, primary: Server, replica: Server, timeout_s: float) -> None:
        _wait(lambda: answers(primary.port), timeout_s, "the primary did not start")
        _wait(
            lambda: answers(replica.port) and info(replica.port).get("master_link_status") == "up",
            timeout_s,
            "the replica did not sync with the primary",
        )
        others = len(self.sentinel_ports) - 1

        def sentinels_ready() -> bool:
            # Every Sentinel has an INFO from the replica (it promotes no replica it has not
            # heard from) and is connected to every other Sentinel (to hold the vote).
            for port in self.sentinel_ports:
                replicas = [pairs(r) for r in command(port, "SENTINEL", "REPLICAS", self.service)]
                usable = [
                    r
                    for r in replicas
                    if r["flags"] == "slave" and r.get("master-link-status") == "ok"
                ]
                peers = [pairs(p) for p in command(port, "SENTINEL", "SENTINELS", self.service)]
                connected = [p for p in peers if "disconnected" not in p["flags"]]
                if not usable or len(connected) < others:
                    return False
            return True

        _wait(sentinels_ready, timeout_s, "the Sentinels did not discover each other")

    def _save_state(self) -> None:
        self.processes.save_state(
            settings=asdict(self.settings),
            servers=[asdict(s) for s in self.servers],
            sentinel_ports=self.sentinel_ports,
        )

    def describe(self) -> list[str]:
        """One line per data server (state, role, URL) and one for the Sentinels."""
        primary = None
        with contextlib.suppress(SentinelGroupError):
            primary = self.primary()
        lines = [
            f"{server.name}  {'running' if answers(server.port) else 'down':8} "
            f"{'primary' if server == primary else 'replica':8} {server.url}"
            for server in self.servers
        ]
        sentinels = ",".join(f"{h}:{p}" for h, p in self.sentinel_addresses)
        return [*lines, f"sentinels {sentinels}  service {self.service}"]

    @classmethod
    def attach(cls, workdir: Path) -> RedisSentinelGroup:
        """The group an earlier ``up`` left running in ``workdir`` (for status and down)."""
        group = cls(workdir=workdir)
        try:
            state = group.processes.load_state()
        except FileNotFoundError as exc:
            raise SentinelGroupError(str(exc)) from None
        group.settings = SentinelSettings(**state["settings"])
        group.servers = [Server(**s) for s in state["servers"]]
        group.sentinel_ports = [int(p) for p in state["sentinel_ports"]]
        return group


# -- command line -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    return command_line(
        argv,
        prog="redis_sentinel.py",
        description=(
            "Start, inspect or stop a local Redis primary, replica and three Sentinels on free "
            "ports; a Redis already running on this host (e.g. on 6379) is never touched."
        ),
        default_dir=DEFAULT_DIR,
        make=lambda args: RedisSentinelGroup(workdir=Path(args.dir), service=args.service),
        attach=RedisSentinelGroup.attach,
        errors=(SentinelGroupError,),
        up_options=lambda parser: parser.add_argument(
            "--service", default="rundispatch", help="the Sentinel service name"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
