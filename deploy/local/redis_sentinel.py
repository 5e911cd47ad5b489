#!/usr/bin/env python3
"""A local Redis primary, one replica and three Sentinels, on free ports under a temporary dir.

    python3 deploy/local/redis_sentinel.py up     [--dir DIR]
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
every second, ``noeviction``) with only the port and directory changed. Nothing here touches
another Redis on the host.

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
*not* lost. It also stops answering the Sentinels, which then count it down and will not
promote it until it has answered again. The cut has neither problem. Its one limit: Sentinel
skips a replica whose link has been down longer than ``10 x down-after-milliseconds`` (plus the
time the primary has been down), so kill the primary within that window of the cut (10 s with
the default ``down_after_ms=1000``).

Standard library only (a 40-line RESP client), like ``services.py``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REDIS_CONF = Path(__file__).resolve().parents[1] / "redis" / "redis.conf"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "rundispatch-redis-sentinel"
STATE_FILE = "group.json"
REPLICATION_USER = "replicator"
HOST = "127.0.0.1"


class SentinelGroupError(RuntimeError):
    """The group could not be started, reached or switched over; the message says why."""


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def command(port: int, *args: str | int, timeout: float = 5.0) -> Any:
    """Send one command to the Redis (or Sentinel) on ``port`` and return its decoded reply."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = str(arg).encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((HOST, port), timeout) as sock:
        sock.sendall(payload)
        reader = sock.makefile("rb")
        return _read_reply(reader)


def _read_reply(reader: Any) -> Any:
    line: bytes = reader.readline()
    if not line:
        raise ConnectionError("connection closed before a reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line!r}")


def info(port: int, section: str = "replication") -> dict[str, str]:
    text = command(port, "INFO", section)
    pairs = (line.split(":", 1) for line in str(text).splitlines() if ":" in line)
    return {key: value for key, value in pairs}


def answers(port: int) -> bool:
    try:
        return bool(command(port, "PING", timeout=0.5) == "PONG")
    except (OSError, RespError):
        return False


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


class RedisSentinelGroup:
    """Start, inspect, break and stop a primary, a replica and ``sentinels`` Sentinels.

    ``down_after_ms``: how long a primary must not answer before a Sentinel counts it down
    (``down-after-milliseconds``); failover follows within about a second or two after that.
    ``server_config``: directives added to both data servers' configuration (e.g.
    ``min-replicas-to-write 1``).
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
        if shutil.which("redis-server") is None:
            raise SentinelGroupError(
                "redis-server is missing: install Redis 7 (Debian/Ubuntu: "
                "apt-get install -y redis-server)"
            )
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.server_config = server_config
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="rundispatch-sentinel-"))
        self.servers: list[Server] = []
        self.sentinel_ports: list[int] = []
        self._sentinel_count = sentinels
        self._password = secrets.token_hex(16)  # the replication user's
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # Processes an earlier ``up`` left running (``attach``): stopped by ``down``.
        self._adopted: dict[str, int] = {}
        self._frozen: set[str] = set()
        self.boot_s = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> RedisSentinelGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 30.0) -> None:
        """Start both data servers and the Sentinels; return once the replica is in sync and
        every Sentinel knows the replica and the other Sentinels (a failover can happen)."""
        if self.dir.exists() and any(self.dir.iterdir()):
            # ``stop`` deletes the directory: it must hold nothing but the group.
            raise SentinelGroupError(f"{self.dir} is not empty: give a new or empty directory")
        began = time.monotonic()
        atexit.register(self.stop)  # also when the caller forgets, or fails before its finally
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.servers = [
                Server(f"redis-{i}", free_port(), str(self.dir / f"redis-{i}")) for i in (1, 2)
            ]
            primary, replica = self.servers
            self._spawn_server(primary)
            self._spawn_server(replica, replica_of=primary)
            self.sentinel_ports = [free_port() for _ in range(self._sentinel_count)]
            ids = [secrets.token_hex(20) for _ in self.sentinel_ports]
            for index, port in enumerate(self.sentinel_ports):
                self._spawn_sentinel(index + 1, port, ids, primary, replica)
            self._wait_ready(primary, replica, timeout_s)
        except BaseException:
            self.stop()
            raise
        self.boot_s = time.monotonic() - began
        self._save_state()

    def stop(self) -> None:
        """Kill every process of the group and delete its directory (if we made it)."""
        atexit.unregister(self.stop)
        for name in list(self._procs):
            self._kill(name)
        adopted = [pid for pid in self._adopted.values() if _started_here(pid, self.dir)]
        for pid in adopted:  # never a pid reused by someone else since
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_started_here(pid, self.dir) for pid in adopted) and time.monotonic() < deadline:
            time.sleep(0.1)  # not our children: wait until they are gone
        self._adopted.clear()
        if self._own_dir or (self.dir / STATE_FILE).exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- addresses and roles ---------------------------------------------------------------

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
        port = max(votes, key=lambda p: votes[p])
        return self.server(port)

    def replica(self) -> Server:
        """The data server that is not the primary."""
        primary = self.primary()
        return next(s for s in self.servers if s != primary)

    def role(self, server: Server) -> str:
        """What the server itself says it is: ``master`` or ``slave``."""
        return info(server.port)["role"]

    def is_running(self, server: Server) -> bool:
        proc = self._procs.get(server.name)
        return proc is not None and proc.poll() is None

    # -- faults ----------------------------------------------------------------------------

    def wait_in_sync(self, timeout_s: float = 30.0) -> float:
        """Wait until the replica is linked to the primary and has every write it acknowledged
        so far (after a start, a failover or ``resume_replica``). Returns the seconds waited."""
        began = time.monotonic()

        def in_sync() -> bool:
            primary, replica = self.primary(), self.replica()
            if info(replica.port).get("master_link_status") != "up":
                return False
            if int(info(replica.port).get("master_port", -1)) != primary.port:
                return False
            wanted = int(info(primary.port)["master_repl_offset"])
            return int(info(replica.port)["slave_repl_offset"]) >= wanted

        _wait(in_sync, timeout_s, "the replica did not catch up with the primary")
        return time.monotonic() - began

    def lag_replica(self) -> int:
        """Cut the replica off: from now on it receives nothing, and the primary goes on
        acknowledging writes. Returns the primary's replication offset at the cut (the
        replica holds everything before it: call ``wait_in_sync`` first if in doubt)."""
        primary = self.primary()
        if info(self.replica().port).get("master_link_status") != "up":
            raise SentinelGroupError("the replica is not linked to the primary: wait_in_sync()")
        command(primary.port, "ACL", "SETUSER", REPLICATION_USER, "off")
        command(primary.port, "CLIENT", "KILL", "USER", REPLICATION_USER)
        offset = int(info(primary.port)["master_repl_offset"])
        replica = self.replica()
        deadline = time.monotonic() + 5
        while info(replica.port).get("master_link_status") == "up":
            if time.monotonic() > deadline:
                raise SentinelGroupError("the replica is still linked after the cut")
            time.sleep(0.02)
        return offset

    def resume_replica(self) -> None:
        """Let the replica catch up again (undo ``lag_replica``). On every running server: the
        one cut off may have been demoted since, and Sentinel's CONFIG REWRITE keeps the ACL."""
        for server in self.servers:
            if self.is_running(server):
                command(server.port, "ACL", "SETUSER", REPLICATION_USER, "on")

    def freeze(self, server: Server) -> None:
        """SIGSTOP a server (it keeps its sockets; see the module docstring for why this does
        not reliably lose writes)."""
        self._procs[server.name].send_signal(signal.SIGSTOP)
        self._frozen.add(server.name)

    def thaw(self, server: Server) -> None:
        self._procs[server.name].send_signal(signal.SIGCONT)
        self._frozen.discard(server.name)

    def kill(self, server: Server) -> None:
        """SIGKILL a data server (a crash; the AOF keeps what reached the page cache)."""
        self._kill(server.name)
        self._save_state()

    def restart(self, server: Server, timeout_s: float = 20.0) -> None:
        """Start a killed data server again on its port and directory. The Sentinels turn a
        former primary into a replica of the current one."""
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
            names = set()
            for port in self.sentinel_ports:
                try:
                    _, primary_port = command(
                        port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                    )
                except (OSError, RespError):
                    return False
                names.add(int(primary_port))
            if len(names) != 1 or old.port in names:
                return False
            try:
                return info(names.pop())["role"] == "master"
            except (OSError, RespError):
                return False

        _wait(switched, timeout_s, f"no new primary within {timeout_s:.0f} s")
        return self.primary(), time.monotonic() - began

    # -- internals -------------------------------------------------------------------------

    def _spawn_server(self, server: Server, replica_of: Server | None = None) -> None:
        config = Path(server.dir) / "redis.conf"
        if not config.exists():
            # A copy of the product's configuration: Sentinel sends CONFIG REWRITE to the
            # servers it reconfigures, which must never rewrite the file in the repository.
            Path(server.dir).mkdir(parents=True, exist_ok=True)
            overrides = [
                f"port {server.port}",
                f"bind {HOST}",
                f"dir {server.dir}",
                f"logfile {Path(server.dir) / 'redis.log'}",
                "daemonize no",
                # A full sync starts at once instead of waiting 5 s for more replicas to come.
                "repl-diskless-sync-delay 0",
                # The replica authenticates as its own user, so that lag_replica() can refuse it.
                f"user {REPLICATION_USER} on >{self._password} +psync +replconf +ping",
                f"masteruser {REPLICATION_USER}",
                f"masterauth {self._password}",
            ]
            overrides += self.server_config
            if replica_of is not None:
                overrides.append(f"replicaof {HOST} {replica_of.port}")
            config.write_text(REDIS_CONF.read_text() + "\n" + "\n".join(overrides) + "\n")
        self._procs[server.name] = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _spawn_sentinel(
        self, index: int, port: int, ids: list[str], primary: Server, replica: Server
    ) -> None:
        directory = self.dir / f"sentinel-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        name = self.service
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {directory}",
            f"logfile {directory / 'sentinel.log'}",
            f"sentinel myid {ids[index - 1]}",
            f"sentinel monitor {name} {HOST} {primary.port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
            # Told up front what it would otherwise learn from the primary's INFO (every 10 s)
            # and from the other Sentinels' hello messages (every 2 s): ready in a second.
            f"sentinel known-replica {name} {HOST} {replica.port}",
        ]
        lines += [
            f"sentinel known-sentinel {name} {HOST} {other_port} {other_id}"
            for other_port, other_id in zip(self.sentinel_ports, ids, strict=True)
            if other_port != port
        ]
        config = directory / "sentinel.conf"  # Sentinel rewrites it: it must be its own file
        config.write_text("\n".join(lines) + "\n")
        # redis-server in Sentinel mode: Debian's redis-sentinel package is not needed.
        self._procs[f"sentinel-{index}"] = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", str(config), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _wait_ready(self, primary: Server, replica: Server, timeout_s: float) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SentinelGroupError(f"{name} exited at start (see its log in {self.dir})")
        _wait(lambda: answers(primary.port), timeout_s, "the primary did not start")
        _wait(
            lambda: answers(replica.port) and info(replica.port).get("master_link_status") == "up",
            timeout_s,
            "the replica did not sync with the primary",
        )
        others = len(self.sentinel_ports) - 1

        def sentinels_ready() -> bool:
            # Every Sentinel has a fresh INFO from the replica (it promotes no replica it has
            # not heard from) and is connected to every other Sentinel (to hold the vote).
            for port in self.sentinel_ports:
                replicas = [_pairs(r) for r in command(port, "SENTINEL", "REPLICAS", self.service)]
                usable = [
                    r
                    for r in replicas
                    if r["flags"] == "slave"
                    and r.get("master-link-status") == "ok"
                    and int(r.get("info-refresh", 10**9)) < 5000
                ]
                peers = [_pairs(p) for p in command(port, "SENTINEL", "SENTINELS", self.service)]
                connected = [p for p in peers if "disconnected" not in p["flags"]]
                if not usable or len(connected) < others:
                    return False
            return True

        _wait(sentinels_ready, timeout_s, "the Sentinels did not discover each other")

    def _kill(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        self._frozen.discard(name)

    def _save_state(self) -> None:
        state = {
            "service": self.service,
            "servers": [s.__dict__ for s in self.servers],
            "sentinel_ports": self.sentinel_ports,
            "pids": {name: proc.pid for name, proc in self._procs.items()},
        }
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, workdir: Path) -> RedisSentinelGroup:
        """The group an earlier ``up`` left running in ``workdir`` (for status and down)."""
        path = workdir / STATE_FILE
        if not path.exists():
            raise SentinelGroupError(f"no Sentinel group in {workdir} (no {STATE_FILE})")
        state = json.loads(path.read_text())
        group = cls(service=state["service"], workdir=workdir)
        group.servers = [Server(**s) for s in state["servers"]]
        group.sentinel_ports = [int(p) for p in state["sentinel_ports"]]
        group._adopted = {name: int(pid) for name, pid in state["pids"].items()}
        return group

    def detach(self) -> None:
        """Leave the processes running when this object goes (``up`` hands them to ``down``)."""
        atexit.unregister(self.stop)
        self._procs.clear()


def _started_here(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is still a server or Sentinel of ``workdir`` (each runs in its own
    directory under it), not a pid reused by another process since."""
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return cwd.is_relative_to(workdir.resolve())


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _wait(condition: Any, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (OSError, RespError):
            pass
        if time.monotonic() > deadline:
            raise SentinelGroupError(message)
        time.sleep(0.05)


@contextlib.contextmanager
def redis_sentinel_group(**kwargs: Any) -> Iterator[RedisSentinelGroup]:
    """``with redis_sentinel_group() as group:`` — started on entry, stopped on exit."""
    group = RedisSentinelGroup(**kwargs)
    group.start()
    try:
        yield group
    finally:
        group.stop()


# -- command line -------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    if (workdir / STATE_FILE).exists():
        print(f"a Sentinel group already runs in {workdir}: run 'down' first", file=sys.stderr)
        return 1
    group = RedisSentinelGroup(workdir=workdir, service=args.service)
    try:
        group.start()
    except SentinelGroupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print(group)
    print(f"up in {group.boot_s:.1f} s; stop with: {sys.argv[0]} down --dir {workdir}")
    group.detach()  # the processes outlive this command on purpose
    return 0


def _print(group: RedisSentinelGroup) -> None:
    primary = None
    with contextlib.suppress(SentinelGroupError):
        primary = group.primary()
    for server in group.servers:
        role = "primary" if server == primary else "replica"
        state = "running" if answers(server.port) else "down"
        print(f"{server.name}  {state:8} {role:8} {server.url}")
    sentinels = ",".join(f"{h}:{p}" for h, p in group.sentinel_addresses)
    print(f"sentinels {sentinels}  service {group.service}")


def _status(args: argparse.Namespace) -> int:
    try:
        group = RedisSentinelGroup.attach(Path(args.dir))
    except SentinelGroupError as exc:
        print(exc, file=sys.stderr)
        return 1
    _print(group)
    return 0


def _down(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    if not (workdir / STATE_FILE).exists():
        print(f"no Sentinel group in {workdir}", file=sys.stderr)
        return 0
    RedisSentinelGroup.attach(workdir).stop()
    print(f"stopped the Sentinel group and deleted {workdir}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="redis_sentinel.py",
        description=(
            "Start, inspect or stop a local Redis primary, replica and three Sentinels on free "
            "ports; a Redis already running on this host (e.g. on 6379) is never touched."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the group and print its addresses")
    up.add_argument("--service", default="rundispatch", help="the Sentinel service name")
    sub.add_parser("status", help="show each server, its role and the Sentinels")
    sub.add_parser("down", help="kill the group and delete its directory")
    for command_parser in sub.choices.values():
        command_parser.add_argument(
            "--dir", default=str(DEFAULT_DIR), help=f"the group's directory (default {DEFAULT_DIR})"
        )
    args = parser.parse_args(argv)
    return {"up": _up, "status": _status, "down": _down}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
