"""The layout of a local RabbitMQ cluster: each node's name, ports, files and environment, and
the management API they serve. ``rabbitmq_cluster.py`` starts and breaks the nodes.

Everything a node reads comes from the cluster's directory, never from ``/etc/rabbitmq`` (whose
``rabbitmq-env.conf`` names the host's own node) nor from the user's home (the Erlang cookie).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "localhost"
# The management plugin serves /api on every node; guest may log in from 127.0.0.1.
USER, PASSWORD = "guest", "guest"
# Loopback only: never through an http_proxy the environment may set.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClusterError(RuntimeError):
    """The cluster could not be started, reached or stopped; the message says why."""


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

    def log_tail(self, lines: int = 15) -> str:
        """The end of the node's newest log (its console output or RabbitMQ's own log)."""
        base = Path(self.base)
        logs = [*base.glob("*.log"), *(base / "log").glob("*.log")]
        if not logs:
            return "(no log)"
        text = max(logs, key=lambda p: p.stat().st_mtime).read_text(errors="replace")
        return " | ".join(text.splitlines()[-lines:])


def write_files(directory: Path, nodes: list[Node], extra_config: tuple[str, ...]) -> None:
    """The shared files (a new Erlang cookie, empty env and advanced configs, the enabled
    plugins) and each node's ``rabbitmq.conf``. Every node but the first joins the first at
    its first boot (classic peer discovery)."""
    home = directory / "home"
    home.mkdir(exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20).upper())
    cookie.chmod(0o400)
    (directory / "rabbitmq-env.conf").write_text("")
    (directory / "advanced.config").write_text("[].\n")
    (directory / "enabled_plugins").write_text("[rabbitmq_management].\n")
    seed = nodes[0].name
    for node in nodes:
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
            lines += [
                "cluster_formation.peer_discovery_backend = classic_config",
                f"cluster_formation.classic_config.nodes.1 = {seed}",
                "cluster_formation.discovery_retry_limit = 240",
                "cluster_formation.discovery_retry_interval = 500",
            ]
        lines += list(extra_config)
        (Path(node.base) / "rabbitmq.conf").write_text("\n".join(lines) + "\n")


def environment(directory: Path, epmd_port: int, node: Node | None = None) -> dict[str, str]:
    """The environment of a node (or, without ``node``, of a CLI call or of epmd): the
    cluster's cookie (``HOME``), epmd, configuration, data and log directories."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=str(directory / "home"),
        ERL_EPMD_PORT=str(epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_CONF_ENV_FILE=str(directory / "rabbitmq-env.conf"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(directory / "enabled_plugins"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(directory / "advanced.config"),
        # Erlang distribution listens on loopback only.
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    if node is not None:
        base = Path(node.base)
        env.update(
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "pid"),
        )
    return env


def management_get(nodes: list[Node], path: str) -> Any:
    """GET a management API path from the first of ``nodes`` that answers (a 404 is an
    answer: ClusterError at once)."""
    if not nodes:
        raise ClusterError("no node of the cluster is running")
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    last: Exception | None = None
    for node in nodes:
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
