#!/usr/bin/env python3
"""A local RabbitMQ cluster (3 nodes by default) beside any broker already running on this host.

    python3 deploy/local/rabbitmq_cluster.py up     [--nodes 3] [--dir DIR]
    python3 deploy/local/rabbitmq_cluster.py status [--dir DIR]
    python3 deploy/local/rabbitmq_cluster.py down   [--dir DIR]

``up`` boots the nodes (``rdc1@localhost``, ``rdc2@localhost``...), forms the cluster, enables the
management plugin on every node, prints the AMQP URLs and leaves the nodes running; ``down``
stops them and deletes their directory. From Python::

    with RabbitCluster() as cluster:
        cluster.urls                    # one AMQP URL per node
        cluster.leader_of("q")          # "rdc2@localhost" (quorum queue leader, classic home)
        cluster.stop_node("rdc2@localhost", kill=True)
        cluster.start_node("rdc2@localhost")

Nothing is shared with another broker on the host, so the nodes can be killed at will:

* its own **Erlang cookie** (``HOME`` points into the cluster directory): the nodes and the CLI
  calls made here cannot reach any other Erlang node, such as the host's ``rabbit@...``;
* its own **epmd** on a free port (``ERL_EPMD_PORT``): node names never clash with another
  cluster started by someone else on the same host;
* its own configuration, ``rabbitmq-env.conf``, enabled-plugins file, data and log directories,
  and free ports for AMQP, Erlang distribution and the management API (all on 127.0.0.1).

The first node boots alone; the others are told (classic peer discovery) to join it, so all of
them boot at the same time and no ``stop_app`` / ``join_cluster`` / ``start_app`` round is
needed. Standard library only, like ``services.py``: it runs before any virtual environment.
"""

from __future__ import annotations

import argparse
import atexit
import base64
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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SBIN = Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
STATE_FILE = "cluster.json"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "rundispatch-rabbitmq-cluster"
HOST = "localhost"
# The management plugin serves /api on every node; guest may log in from 127.0.0.1.
USER, PASSWORD = "guest", "guest"


# Loopback only: never through an http_proxy the environment may set.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Node:
    """One node's name, ports and directory."""

    name: str  # rdc1@localhost
    amqp_port: int
    dist_port: int
    management_port: int
    base: str  # the node's own directory

    @property
    def short(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def amqp_url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"


class RabbitCluster:
    """Start, inspect, break and stop a local RabbitMQ cluster.

    ``workdir``: where every node keeps its data, logs and configuration (a new temporary
    directory by default; deleted by ``stop``). ``extra_config``: lines appended to every
    node's ``rabbitmq.conf`` (e.g. ``consumer_timeout = 5000``).
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        prefix: str = "rdc",
        workdir: Path | None = None,
        extra_config: tuple[str, ...] = (),
        boot_timeout_s: float = 180.0,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            if not (SBIN / tool).exists():
                raise ClusterError(
                    f"{SBIN / tool} is missing: install RabbitMQ 3.10 or later "
                    "(Debian/Ubuntu: apt-get install -y rabbitmq-server), or point "
                    "RABBITMQ_SBIN at the directory holding rabbitmq-server"
                )
        self.size = nodes
        self.prefix = prefix
        self.extra_config = extra_config
        self.boot_timeout_s = boot_timeout_s
        self._own_dir = workdir is None
        self.dir = workdir or Path(tempfile.mkdtemp(prefix="rundispatch-rmq-cluster-"))
        self.nodes: list[Node] = []
        self.epmd_port = 0
        self._epmd: subprocess.Popen[bytes] | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # Process groups an earlier ``up`` left running (``attach``): stopped by ``down``.
        self._adopted: dict[str, int] = {}
        self.boot_s = 0.0  # how long ``start`` took: the figure CI cares about

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> RabbitCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Boot every node and wait until they all run as one cluster."""
        if self.dir.exists() and any(self.dir.iterdir()):
            # ``stop`` deletes the directory: it must hold nothing but the cluster.
            raise ClusterError(f"{self.dir} is not empty: give a new or empty directory")
        began = time.monotonic()
        atexit.register(self.stop)  # also when the caller forgets, or fails before its finally
        try:
            self._prepare()
            self._start_epmd()
            # The seed first, fully booted: a node joining a seed that is still enabling its
            # feature flags can fail its schema check (seen here once in ~20 boots).
            seed, *others = self.nodes
            self._spawn(seed)
            self._wait_clustered()
            for node in others:
                self._spawn(node)
            self._wait_clustered(fresh=others)
        except BaseException:
            self.stop()
            raise
        self.boot_s = time.monotonic() - began
        self._save_state()

    def stop(self) -> None:
        """Kill every node and the private epmd, then delete the directory (if we made it).

        Nodes are killed, not stopped gracefully: their data is deleted right after, and a
        graceful stop of three nodes costs several seconds each for nothing."""
        atexit.unregister(self.stop)
        for name in list(self._procs):
            self._kill(name)
        adopted = [pid for pid in self._adopted.values() if _started_here(pid, self.dir)]
        for pid in adopted:  # never a pid reused by someone else since
            _kill_group(pid)
        deadline = time.monotonic() + 10
        while any(_started_here(pid, self.dir) for pid in adopted) and time.monotonic() < deadline:
            time.sleep(0.1)  # not our children: wait until they are gone
        self._adopted.clear()
        if self._epmd is not None:
            _kill_group(self._epmd.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(timeout=10)
            self._epmd = None
        if self._own_dir or (self.dir / STATE_FILE).exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the tests use ----------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [node.amqp_url for node in self.nodes]

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if name in (node.name, node.short):
                return node
        raise KeyError(f"no node {name!r} in this cluster ({', '.join(self.names)})")

    def is_running(self, name: str) -> bool:
        proc = self._procs.get(self.node(name).name)
        return proc is not None and proc.poll() is None

    def stop_node(self, name: str, *, kill: bool = False, timeout_s: float = 60.0) -> float:
        """Stop one node: SIGKILL (a crash) when ``kill``, else a graceful shutdown (SIGTERM,
        which RabbitMQ handles like ``rabbitmqctl stop``). Returns the seconds it took."""
        node = self.node(name)
        proc = self._procs.get(node.name)
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"{node.name} is not running")
        began = time.monotonic()
        if kill:
            self._kill(node.name)
        else:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._kill(node.name)
            # The node's helpers (erl_child_setup, port programs) go with its process group.
            _kill_group(proc.pid)
            self._procs.pop(node.name, None)
        self._save_state()
        return time.monotonic() - began

    def start_node(self, name: str) -> float:
        """Start a stopped node again (it rejoins the cluster from its data directory) and wait
        until every node reports it running. Returns the seconds it took."""
        node = self.node(name)
        if self.is_running(node.name):
            raise ClusterError(f"{node.name} is already running")
        began = time.monotonic()
        self._spawn(node)
        self._wait_clustered()
        self._save_state()
        return time.monotonic() - began

    def running_nodes(self, via: str | None = None) -> list[str]:
        """Nodes the cluster reports running, asked through ``via`` (or any running node)."""
        listed = self.api("/api/nodes", via=via)
        return sorted(n["name"] for n in listed if n.get("running"))

    def queue_info(self, queue: str, vhost: str = "/", via: str | None = None) -> dict[str, Any]:
        quoted = urllib.parse.quote(vhost, safe="") + "/" + urllib.parse.quote(queue, safe="")
        info: dict[str, Any] = self.api(f"/api/queues/{quoted}", via=via)
        return info

    def leader_of(self, queue: str, vhost: str = "/", *, timeout_s: float = 15.0) -> str:
        """The node leading a quorum queue (or hosting a classic queue), from the management
        API; waits while the queue has no known leader (right after a declaration or a
        failover the statistics take up to ``collect_statistics_interval`` to show it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                info = self.queue_info(queue, vhost)
                leader = info.get("leader") or info.get("node")
                if leader and leader in self._running_names():
                    return str(leader)
            except ClusterError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"no running leader known for queue {queue!r}")
            time.sleep(0.25)

    def rabbitmqctl(self, *args: str, node: str | None = None, timeout_s: float = 60.0) -> str:
        """Run ``rabbitmqctl ARGS`` against one node (default: the first running one), with
        the cluster's cookie and epmd. Returns its output; raises ClusterError on failure.
        Each call starts an Erlang VM: ~0.6 s here, so the API above prefers HTTP."""
        return self._cli("rabbitmqctl", *args, node=node, timeout_s=timeout_s)

    def rabbitmq_queues(self, *args: str, node: str | None = None) -> str:
        """``rabbitmq-queues ARGS`` (e.g. ``quorum_status NAME``), like ``rabbitmqctl``."""
        return self._cli("rabbitmq-queues", *args, node=node)

    def api(self, path: str, *, via: str | None = None) -> Any:
        """GET a management API path from ``via`` (or the first running node)."""
        candidates = [self.node(via)] if via else [n for n in self.nodes if self.is_running(n.name)]
        if not candidates:
            raise ClusterError("no node of the cluster is running")
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        last: Exception | None = None
        for node in candidates:
            request = urllib.request.Request(
                node.management_url + path, headers={"Authorization": f"Basic {token}"}
            )
            try:
                with _DIRECT.open(request, timeout=5) as response:
                    body = response.read()
                    return json.loads(body) if body else None
            except urllib.error.HTTPError as exc:
                if exc.code == 404:
                    raise ClusterError(f"{path}: not found on {node.name}") from exc
                last = exc
            except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
                last = exc
        raise ClusterError(f"management API {path} did not answer: {last}")

    # -- internals -------------------------------------------------------------------------

    def _prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        home = self.dir / "home"
        home.mkdir(exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        # Nothing from /etc/rabbitmq: NODENAME, ERL_FLAGS and listeners there are the host's.
        (self.dir / "rabbitmq-env.conf").write_text("")
        (self.dir / "advanced.config").write_text("[].\n")
        (self.dir / "enabled_plugins").write_text("[rabbitmq_management].\n")
        self.epmd_port = free_port()
        self.nodes = [
            Node(
                name=f"{self.prefix}{index}@{HOST}",
                amqp_port=free_port(),
                dist_port=free_port(),
                management_port=free_port(),
                base=str(self.dir / f"{self.prefix}{index}"),
            )
            for index in range(1, self.size + 1)
        ]
        seed = self.nodes[0].name
        for node in self.nodes:
            Path(node.base).mkdir(exist_ok=True)
            lines = [
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
                f"management.tcp.port = {node.management_port}",
                "management.tcp.ip = 127.0.0.1",
                # Fresher queue statistics: leader_of() reads them after a failover.
                "collect_statistics_interval = 1000",
                "log.console = false",
                "log.file.level = info",
            ]
            if node.name != seed:
                # Join the seed at first boot; wait for it while it is still booting.
                lines += [
                    "cluster_formation.peer_discovery_backend = classic_config",
                    f"cluster_formation.classic_config.nodes.1 = {seed}",
                    "cluster_formation.discovery_retry_limit = 240",
                    "cluster_formation.discovery_retry_interval = 500",
                ]
            lines += list(self.extra_config)
            (Path(node.base) / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=str(self.dir / "home"),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(self.dir / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            # Erlang distribution listens on loopback only.
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(Path(node.base) / "rabbitmq.conf"),
                RABBITMQ_MNESIA_BASE=str(Path(node.base) / "mnesia"),
                RABBITMQ_LOG_BASE=str(Path(node.base) / "log"),
                RABBITMQ_PID_FILE=str(Path(node.base) / "pid"),
            )
        return env

    def _start_epmd(self) -> None:
        # Our own port mapper, in the foreground so that we hold its pid and can stop it.
        self._epmd = subprocess.Popen(
            [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self._env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not port_answers(self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.05)

    def _spawn(self, node: Node) -> None:
        log_dir = Path(node.base) / "log"
        log_dir.mkdir(exist_ok=True)
        with (log_dir / "stdout.log").open("ab") as output:
            self._procs[node.name] = subprocess.Popen(
                [str(SBIN / "rabbitmq-server")],
                env=self._env(node),
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killed as one
            )

    def _kill(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    def _running_names(self) -> list[str]:
        return [n.name for n in self.nodes if self.is_running(n.name)]

    def _wait_clustered(self, fresh: list[Node] | None = None) -> None:
        """Wait until every node we run answers on AMQP and lists all running nodes.

        ``fresh``: nodes booting for the first time; one that fails to join (two nodes joining
        at once can still collide) is wiped and booted again, once."""
        deadline = time.monotonic() + self.boot_timeout_s
        expected = sorted(self._running_names())
        retried: set[str] = set()
        fresh_names = {node.name for node in fresh or []}
        while True:
            for name, proc in list(self._procs.items()):
                if proc.poll() is None:
                    continue
                if name in fresh_names and name not in retried:
                    retried.add(name)
                    self._procs.pop(name)
                    with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
                        # The seed may already count it as a member: forget that first.
                        self._cli("rabbitmqctl", "forget_cluster_node", name, timeout_s=30)
                    shutil.rmtree(Path(self.node(name).base) / "mnesia", ignore_errors=True)
                    self._spawn(self.node(name))
                    continue
                raise ClusterError(f"{name} exited while booting: {self._log_tail(name)}")
            if all(self._sees_all(self.node(name), expected) for name in expected):
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the cluster did not form within {self.boot_timeout_s:.0f} s: "
                    + "; ".join(f"{n}: {self._log_tail(n)}" for n in expected)
                )
            time.sleep(0.5)

    def _sees_all(self, node: Node, expected: list[str]) -> bool:
        if not port_answers(node.amqp_port):
            return False
        try:
            return self.running_nodes(via=node.name) == expected
        except ClusterError:
            return False

    def _log_tail(self, name: str, lines: int = 15) -> str:
        node = self.node(name)
        logs = sorted((Path(node.base) / "log").glob("*.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return "(no log)"
        text = logs[-1].read_text(errors="replace").splitlines()
        return " | ".join(text[-lines:])

    def _cli(self, tool: str, *args: str, node: str | None = None, timeout_s: float = 60.0) -> str:
        target = self.node(node) if node else self.node(self._running_names()[0])
        result = subprocess.run(
            [str(SBIN / tool), "-n", target.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(args)} on {target.name} failed: {result.stderr.strip()}"
            )
        return result.stdout

    # -- state for the CLI (up in one process, down in another) ----------------------------

    def _save_state(self) -> None:
        pids = {name: proc.pid for name, proc in self._procs.items()}
        if self._epmd is not None:
            pids["epmd"] = self._epmd.pid
        state = {
            "epmd_port": self.epmd_port,
            "nodes": [asdict(n) for n in self.nodes],
            "pids": pids,
            "boot_s": round(self.boot_s, 1),
        }
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, workdir: Path) -> RabbitCluster:
        """The cluster an earlier ``up`` left running in ``workdir`` (for status and down)."""
        path = workdir / STATE_FILE
        if not path.exists():
            raise ClusterError(f"no cluster in {workdir} (no {STATE_FILE})")
        state = json.loads(path.read_text())
        cluster = cls(len(state["nodes"]), workdir=workdir)
        cluster.nodes = [Node(**n) for n in state["nodes"]]
        cluster.epmd_port = int(state["epmd_port"])
        cluster.boot_s = float(state.get("boot_s", 0.0))
        cluster._adopted = {name: int(pid) for name, pid in state["pids"].items()}
        return cluster

    def adopted_alive(self, name: str) -> bool:
        pid = self._adopted.get(name)
        return pid is not None and _started_here(pid, self.dir)

    def detach(self) -> None:
        """Leave the nodes running when this object goes (``up`` hands them to ``down``)."""
        atexit.unregister(self.stop)
        self._procs.clear()
        self._epmd = None


def _started_here(pid: int, workdir: Path) -> bool:
    """Whether ``pid`` is still a process this harness started for ``workdir`` (its
    environment carries the cluster's HOME), not a reused pid."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"HOME={workdir / 'home'}".encode() in environ.split(b"\0")


def _kill_group(pid: int) -> None:
    """SIGKILL the process group a node (or epmd) was started in."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def rabbitmq_cluster(nodes: int = 3, **kwargs: Any) -> Iterator[RabbitCluster]:
    """``with rabbitmq_cluster() as cluster:`` — started on entry, stopped on exit."""
    cluster = RabbitCluster(nodes, **kwargs)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


# -- command line -------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    if (workdir / STATE_FILE).exists():
        print(f"a cluster already runs in {workdir}: run 'down' first", file=sys.stderr)
        return 1
    workdir.mkdir(parents=True, exist_ok=True)
    cluster = RabbitCluster(args.nodes, workdir=workdir)
    print(f"starting {args.nodes} RabbitMQ nodes in {workdir} ...", file=sys.stderr)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for node in cluster.nodes:
        print(f"{node.name}  amqp {node.amqp_url}  management {node.management_url}")
    print(f"RUNDISPATCH_AMQP_URL={','.join(cluster.urls)}")
    print(f"up in {cluster.boot_s:.1f} s; stop with: {sys.argv[0]} down --dir {workdir}")
    cluster.detach()  # the nodes outlive this command on purpose
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        cluster = RabbitCluster.attach(Path(args.dir))
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        return 1
    for node in cluster.nodes:
        alive = cluster.adopted_alive(node.name)
        state = "running" if alive and port_answers(node.amqp_port) else "down"
        print(f"{node.name}  {state:8} amqp {node.amqp_url}  management {node.management_url}")
    print(f"RUNDISPATCH_AMQP_URL={','.join(cluster.urls)}")
    return 0


def _down(args: argparse.Namespace) -> int:
    workdir = Path(args.dir)
    if not (workdir / STATE_FILE).exists():
        print(f"no cluster in {workdir}", file=sys.stderr)
        return 0
    cluster = RabbitCluster.attach(workdir)
    cluster.stop()
    print(f"stopped the cluster and deleted {workdir}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rabbitmq_cluster.py",
        description=(
            "Start, inspect or stop a local RabbitMQ cluster on free ports, with its own "
            "Erlang cookie, epmd and data directory; a broker already running on this host "
            "(e.g. rabbit@localhost on 5672) is never touched."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot the nodes, form the cluster, print the AMQP URLs")
    up.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    for name, helptext in (
        ("status", "show each node and whether it runs"),
        ("down", "kill the nodes and delete the cluster directory"),
    ):
        sub.add_parser(name, help=helptext)
    for command in sub.choices.values():
        command.add_argument(
            "--dir",
            default=str(DEFAULT_DIR),
            help=f"the cluster's directory (default {DEFAULT_DIR})",
        )
    args = parser.parse_args(argv)
    handler = {"up": _up, "status": _status, "down": _down}[args.command]
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
