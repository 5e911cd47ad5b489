"""A real Prometheus for tests: Debian's ``prometheus`` binary on a free local port.

    with prometheus_server({"rundispatch-dispatcher": [f"127.0.0.1:{port}"]}) as prom:
        prom.wait_for_targets_up()
        series = prom.wait_for(lambda: prom.query("rundispatch_runs_submitted_total"))

The generated configuration scrapes the given ``host:port`` targets every second, evaluates the
repository's alert rules every second, and keeps its data in a temporary directory that is
removed on exit. Queries go through the HTTP API with the standard library only.

Also here: :func:`dashboard_queries`, every PromQL expression of the Grafana dashboards with
their variables expanded, ready to run against the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO / "dashboards" / "alerts.rules.yml"
DASHBOARDS = (REPO / "dashboards" / "operators.json", REPO / "dashboards" / "sre.json")
DISPATCHER_JOB = "rundispatch-dispatcher"
WORKER_JOB = "rundispatch-worker"

T = TypeVar("T")


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its API answered with an error."""


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` binary, or ``None`` when it is not installed."""
    return shutil.which("prometheus")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PromServer:
    """A running Prometheus and small clients of its HTTP API."""

    url: str
    data_dir: Path
    config_file: Path
    log_file: Path
    process: subprocess.Popen[bytes]

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise on an API error."""
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(f"{path} {params}: {body.get('error', exc)}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now; return its series (``metric`` and ``value``)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float | None:
        """The value of a query that returns at most one series (``None`` when none)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{expr} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing), each with ``labels``, ``state``, ``value``."""
        return list(self.api("alerts")["alerts"])

    def firing(self, alertname: str) -> list[dict[str, Any]]:
        """The firing alerts of one rule."""
        return [
            alert
            for alert in self.alerts()
            if alert["labels"].get("alertname") == alertname and alert["state"] == "firing"
        ]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, with its ``health`` and ``lastError``."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets, each with ``labels``, ``health`` and ``lastError``."""
        return list(self.api("targets", state="active")["activeTargets"])

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        interval: float = 0.25,
        what: str = "condition",
    ) -> T:
        """Call ``predicate`` until it returns something truthy and return that."""
        deadline = time.monotonic() + timeout
        last: T = predicate()
        while not last:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not met in {timeout:g}s (last: {last!r})")
            self.check_running()
            time.sleep(interval)
            last = predicate()
        return last

    def wait_for_targets_up(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every target has been scraped successfully at least once."""

        def all_up() -> list[dict[str, Any]]:
            targets = self.targets()
            return targets if targets and all(t["health"] == "up" for t in targets) else []

        return self.wait_for(all_up, timeout, what="every scrape target up")

    def check_running(self) -> None:
        """Raise with the end of Prometheus' log if the process has exited."""
        if self.process.poll() is not None:
            raise PrometheusError(
                f"prometheus exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Prometheus' own log."""
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def write_config(
    path: Path,
    jobs: Mapping[str, Sequence[str]],
    rule_files: Iterable[Path],
    scrape_interval: str,
    evaluation_interval: str,
) -> None:
    """Write a Prometheus configuration scraping ``jobs`` (job name -> ``host:port`` list)."""
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(rule_file).resolve()) for rule_file in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def prometheus_server(
    jobs: Mapping[str, Sequence[str]],
    *,
    rule_files: Iterable[Path] = (ALERT_RULES,),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    start_timeout: float = 30.0,
) -> Iterator[PromServer]:
    """Start Prometheus scraping ``jobs`` with the alert rules loaded; stop it on exit.

    ``jobs`` maps a job name (``DISPATCHER_JOB``, ``WORKER_JOB``) to ``host:port`` targets.
    """
    binary = prometheus_binary()
    if binary is None:
        raise PrometheusError("the prometheus binary is not installed (apt-get install prometheus)")
    with tempfile.TemporaryDirectory(prefix="rundispatch-prom-") as tmp:
        root = Path(tmp)
        config_file = root / "prometheus.yml"
        write_config(config_file, jobs, rule_files, scrape_interval, evaluation_interval)
        server = _start(binary, root, config_file, start_timeout)
        try:
            yield server
        finally:
            _stop(server.process)


def _start(binary: str, root: Path, config_file: Path, timeout: float) -> PromServer:
    # The port is picked, released, then bound by Prometheus: retry if someone took it meanwhile.
    for attempt in range(3):
        port = free_port()
        data_dir = root / f"data-{attempt}"
        log_file = root / f"prometheus-{attempt}.log"
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={data_dir}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--web.enable-lifecycle",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "GOMAXPROCS": "2"},
            )
        server = PromServer(f"http://127.0.0.1:{port}", data_dir, config_file, log_file, process)
        if _wait_ready(server, timeout):
            return server
        _stop(process)
        if "address already in use" not in server.log_tail():
            break
    raise PrometheusError(f"prometheus did not become ready:\n{server.log_tail()}")


def _wait_ready(server: PromServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# ---- dashboards -------------------------------------------------------------------------------

# What Grafana substitutes before a query reaches Prometheus; "All" of a multi-value variable
# becomes its allValue (".*" on our dashboards).
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
    "target": ".*",
    "group": ".*",
}


@dataclass(frozen=True)
class PanelQuery:
    """One query of one dashboard panel, as Grafana would send it."""

    dashboard: str
    panel_id: int
    panel: str
    ref_id: str
    expr: str  # with the Grafana variables expanded
    raw_expr: str  # as written in the dashboard


def expand_grafana_variables(expr: str, values: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
    """Replace ``$name`` and ``${name}`` as Grafana does; unknown variables raise.

    ``$1`` (a regex group in ``label_replace``) is no variable name and stays as it is.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", replace, expr)


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel of a dashboard, including panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(
    paths: Iterable[Path] = DASHBOARDS, values: Mapping[str, str] = GRAFANA_VARIABLES
) -> list[PanelQuery]:
    """Every panel query of the given dashboards, variables expanded with ``values``."""
    queries = []
    for path in paths:
        dashboard = json.loads(Path(path).read_text())
        for panel in dashboard_panels(dashboard):
            for target in panel.get("targets", []):
                queries.append(
                    PanelQuery(
                        dashboard=dashboard["uid"],
                        panel_id=panel["id"],
                        panel=panel.get("title", ""),
                        ref_id=target.get("refId", ""),
                        expr=expand_grafana_variables(target.get("expr", ""), values),
                        raw_expr=target.get("expr", ""),
                    )
                )
    return queries
