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

The first node boots alone; the others then boot together and join it (classic peer
discovery), so no ``stop_app`` / ``join_cluster`` / ``start_app`` round is needed. Standard
library only, like ``services.py``: it runs before any virtual environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localprocs import ProcessGroup, command_line, free_port, port_answers
from rabbitmq_nodes import HOST, ClusterError, Node, environment, management_get, write_files

SBIN = Path(os.environ.get("RABBITMQ_SBIN", "/usr/lib/rabbitmq/bin"))
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
DEFAULT_DIR = Path(tempfile.gettempdir()) / "rundispatch-rabbitmq-cluster"


class RabbitCluster:
    """Start, inspect, break and stop a local RabbitMQ cluster.

    ``workdir``: where every node keeps its data, logs and configuration (a new temporary
    directory by default; it must be empty, and ``stop`` deletes it). ``extra_config``: lines
    appended to every node's ``rabbitmq.conf`` (e.g. ``consumer_timeout = 5000``).
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
        self.processes = ProcessGroup(workdir, "rundispatch-rmq-cluster-")
        self.dir = self.processes.dir
        self.nodes: list[Node] = []
        self.epmd_port = 0
        self.boot_s = 0.0  # how long ``start`` took: the figure CI cares about

    def __enter__(self) -> RabbitCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Boot every node and wait until they all run as one cluster."""
        try:
            self.processes.claim_dir()
        except RuntimeError as exc:
            raise ClusterError(str(exc)) from None
        began = time.monotonic()
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
        """Kill every node and the private epmd, and delete the directory. Killed, not stopped
        gracefully: their data goes right after, and a graceful stop costs seconds per node."""
        self.processes.stop_all()

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
        return self.processes.running(self.node(name).name)

    def stop_node(self, name: str, *, kill: bool = False, timeout_s: float = 60.0) -> float:
        """Stop one node: SIGKILL (a crash) when ``kill``, else a graceful shutdown (SIGTERM,
        which RabbitMQ handles like ``rabbitmqctl stop``). Returns the seconds it took."""
        node = self.node(name)
        proc = self.processes.procs.get(node.name)
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"{node.name} is not running")
        began = time.monotonic()
        if not kill:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        # The node's helpers (erl_child_setup, port programs) go with its process group.
        self.processes.kill(node.name)
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
        API; waits while no running node is known to lead it (right after a declaration or a
        failover the statistics take up to ``collect_statistics_interval`` to show it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(ClusterError):
                info = self.queue_info(queue, vhost)
                leader = info.get("leader") or info.get("node")
                if leader and self.is_running(str(leader)):
                    return str(leader)
            if time.monotonic() > deadline:
                raise ClusterError(f"no running leader known for queue {queue!r}")
            time.sleep(0.25)

    def rabbitmqctl(self, *args: str, node: str | None = None, timeout_s: float = 60.0) -> str:
        """Run ``rabbitmqctl ARGS`` against one node (default: the first running one), with
        the cluster's cookie and epmd. Returns its output; raises ClusterError on failure.
        Each call starts an Erlang VM (~0.6 s here), so the methods above use HTTP."""
        return self._cli("rabbitmqctl", *args, node=node, timeout_s=timeout_s)

    def rabbitmq_queues(self, *args: str, node: str | None = None) -> str:
        """``rabbitmq-queues ARGS`` (e.g. ``quorum_status NAME``), like ``rabbitmqctl``."""
        return self._cli("rabbitmq-queues", *args, node=node)

    def api(self, path: str, *, via: str | None = None) -> Any:
        """GET a management API path from ``via`` (or the first running node that answers)."""
        running = [n for n in self.nodes if self.is_running(n.name)]
        return management_get([self.node(via)] if via else running, path)

    # -- internals -------------------------------------------------------------------------

    def _prepare(self) -> None:
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
        write_files(self.dir, self.nodes, self.extra_config)

    def _env(self, node: Node | None = None) -> dict[str, str]:
        return environment(self.dir, self.epmd_port, node)

    def _start_epmd(self) -> None:
        # Our own port mapper, in the foreground so that we hold its pid and can stop it.
        argv = [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"]
        epmd = self.processes.spawn("epmd", argv, cwd=self.dir / "epmd", env=self._env())
        deadline = time.monotonic() + 10
        while not port_answers(self.epmd_port):
            if epmd.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.05)

    def _spawn(self, node: Node) -> None:
        argv = [str(SBIN / "rabbitmq-server")]
        self.processes.spawn(node.name, argv, cwd=Path(node.base), env=self._env(node))

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
            for name in expected:
                if self.is_running(name):
                    continue
                if name in fresh_names and name not in retried:
                    retried.add(name)
                    self._boot_again(self.node(name))
                    continue
                raise ClusterError(f"{name} exited while booting: {self.node(name).log_tail()}")
            if all(self._sees_all(self.node(name), expected) for name in expected):
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the cluster did not form within {self.boot_timeout_s:.0f} s: "
                    + "; ".join(f"{n}: {self.node(n).log_tail()}" for n in expected)
                )
            time.sleep(0.5)

    def _boot_again(self, node: Node) -> None:
        self.processes.kill(node.name)
        with contextlib.suppress(ClusterError, subprocess.TimeoutExpired):
            # The seed may already count it as a member: forget that first.
            self._cli("rabbitmqctl", "forget_cluster_node", node.name, timeout_s=30)
        shutil.rmtree(Path(node.base) / "mnesia", ignore_errors=True)
        self._spawn(node)

    def _sees_all(self, node: Node, expected: list[str]) -> bool:
        if not port_answers(node.amqp_port):
            return False
        try:
            return self.running_nodes(via=node.name) == expected
        except ClusterError:
            return False

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

    def _save_state(self) -> None:
        self.processes.save_state(
            epmd_port=self.epmd_port, nodes=[asdict(n) for n in self.nodes], boot_s=self.boot_s
        )

    def describe(self) -> list[str]:
        """One line per node (running or down) and the setting that names them all."""
        lines = []
        for node in self.nodes:
            alive = self.is_running(node.name) or self.processes.adopted_running(node.name)
            state = "running" if alive and port_answers(node.amqp_port) else "down"
            lines.append(f"{node.name}  {state:8} {node.amqp_url}  {node.management_url}")
        return [*lines, f"RUNDISPATCH_AMQP_URL={','.join(self.urls)}"]

    @classmethod
    def attach(cls, workdir: Path) -> RabbitCluster:
        """The cluster an earlier ``up`` left running in ``workdir`` (for status and down)."""
        cluster = cls(workdir=workdir)
        try:
            state = cluster.processes.load_state()
        except FileNotFoundError as exc:
            raise ClusterError(str(exc)) from None
        cluster.nodes = [Node(**n) for n in state["nodes"]]
        cluster.size = len(cluster.nodes)
        cluster.epmd_port = int(state["epmd_port"])
        cluster.boot_s = float(state.get("boot_s", 0.0))
        return cluster


# -- command line -------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    return command_line(
        argv,
        prog="rabbitmq_cluster.py",
        description=(
            "Start, inspect or stop a local RabbitMQ cluster on free ports, with its own "
            "Erlang cookie, epmd and data directory; a broker already running on this host "
            "(e.g. rabbit@localhost on 5672) is never touched."
        ),
        default_dir=DEFAULT_DIR,
        make=lambda args: RabbitCluster(args.nodes, workdir=Path(args.dir)),
        attach=RabbitCluster.attach,
        errors=(ClusterError,),
        up_options=lambda parser: parser.add_argument(
            "--nodes", type=int, default=3, help="how many nodes (default 3)"
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
