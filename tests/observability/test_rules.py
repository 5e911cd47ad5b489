"""Alert rules, dashboards and the Prometheus configuration, checked with promtool and a real
Prometheus.

The promtool and Prometheus tests skip when the binaries are missing, except in CI (``CI`` or
``RUNDISPATCH_REQUIRE_PROMETHEUS`` set), where a missing binary fails: a skip must never hide a
failure. Structural checks need no binary and are ``unit`` tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from dispatcher.metrics import (
    DispatcherMetrics,
    QueueStateSnapshot,
    QueueStats,
    SlotCounts,
    WorkerMetrics,
    exported_names,
    metrics_server,
)
from tests.support.promserver import (
    ALERT_RULES,
    DASHBOARDS,
    DISPATCHER_JOB,
    REPO,
    WORKER_JOB,
    dashboard_panels,
    dashboard_queries,
    prometheus_binary,
    prometheus_server,
)

from .test_metrics_definitions import exercised

RULE_TESTS = REPO / "dashboards" / "tests" / "alerts_test.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
PROVISIONING = REPO / "dashboards" / "provisioning"
RUNBOOKS = REPO / "dashboards" / "runbooks"
RUNBOOK_URL = re.compile(r"^https://github\.com/rundispatch/rundispatch/blob/main/(?P<path>.+)$")
# Series Prometheus makes itself, not the code.
PROMETHEUS_SERIES = frozenset({"up"})
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
     "offset", "bool", "inf", "nan", "atan2"}
)  # fmt: skip


def binaries_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("RUNDISPATCH_REQUIRE_PROMETHEUS"))


def require(binary: str | None, name: str) -> str:
    if binary:
        return binary
    message = f"{name} is not installed (apt-get install prometheus)"
    if binaries_required():
        pytest.fail(f"{message}, and CI requires it")
    pytest.skip(message)


@pytest.fixture(scope="module")
def promtool() -> str:
    return require(shutil.which("promtool"), "promtool")


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"promtool {args}:\n{result.stdout}\n{result.stderr}"
    return result


# ---- reading rules and dashboards -------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def load_dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in DASHBOARDS]


def variable_queries() -> list[str]:
    """PromQL inside the dashboards' query variables (``label_values(<expr>, label)``)."""
    out = []
    for dashboard in load_dashboards():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = variable["query"]
                text = query["query"] if isinstance(query, dict) else query
                match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
                assert match, f"unexpected variable query {text!r}"
                out.append(match.group(1))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are no function, keyword, label."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue
        if match.group(0).lower() not in PROMQL_WORDS:
            names.add(match.group(0))
    return names


@pytest.mark.unit
def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{x=~"y|z"}[5m]))) '
        '/ on (target) group_left max(b offset 15m) or vector(0) > bool 1e3 unless c{d="e(f)"}'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}


# ---- static checks (no binary) ----------------------------------------------------------------


@pytest.mark.unit
def test_dashboards_and_rules_use_only_exported_metric_names() -> None:
    registry = CollectorRegistry()
    DispatcherMetrics(registry)
    WorkerMetrics(registry)
    exported = exported_names(registry) | PROMETHEUS_SERIES
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        used[f"alert {rule['alert']}"] = metric_names(rule["expr"])
    for query in dashboard_queries():
        used[f"{query.dashboard} panel {query.panel_id} {query.ref_id}"] = metric_names(query.expr)
    for expr in variable_queries():
        used[f"variable {expr}"] = metric_names(expr)
    unknown = {where: names - exported for where, names in used.items() if names - exported}
    assert not unknown
    assert all(used.values()), "every query selects at least one metric"


@pytest.mark.unit
def test_dashboard_structure() -> None:
    dashboards = load_dashboards()
    uids = [dashboard["uid"] for dashboard in dashboards]
    assert len(set(uids)) == len(uids)
    for dashboard in dashboards:
        name = dashboard["uid"]
        assert re.fullmatch(r"[a-z0-9-]{1,40}", name)
        assert dashboard["title"] and dashboard["schemaVersion"] >= 36
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert {"target", "group"} <= set(variables)
        panels = list(dashboard_panels(dashboard))
        ids = [panel["id"] for panel in panels]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        cells: dict[tuple[int, int], int] = {}
        for panel in panels:
            where = f"{name} panel {panel['id']} {panel.get('title')!r}"
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["y"] >= 0 and grid["w"] > 0 and grid["h"] > 0, where
            assert grid["x"] + grid["w"] <= 24, f"{where}: wider than 24 columns"
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    assert (x, y) not in cells, f"{where} overlaps panel {cells[(x, y)]}"
                    cells[(x, y)] = panel["id"]
            if panel["type"] == "row":
                continue
            assert panel.get("title"), where
            assert panel.get("targets"), f"{where}: no query"
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), where
            for target in panel["targets"]:
                assert target.get("expr", "").strip(), f"{where}: a target without expr"
                datasource = target.get("datasource") or panel.get("datasource")
                assert datasource == {"type": "prometheus", "uid": "${datasource}"}, where


@pytest.mark.unit
def test_every_alert_has_severity_annotations_and_an_existing_runbook() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == len(names)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        match = RUNBOOK_URL.match(annotations["runbook_url"])
        assert match, f"{rule['alert']}: runbook_url {annotations['runbook_url']}"
        assert (REPO / match["path"]).is_file(), f"{rule['alert']}: no {match['path']}"
    # And every runbook belongs to an alert.
    assert {path.stem for path in RUNBOOKS.glob("*.md")} == set(names)


@pytest.mark.unit
def test_every_alert_has_unit_tests_firing_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested silent"


@pytest.mark.unit
def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    assert [ds["type"] for ds in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "rundispatch.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


@pytest.mark.unit
def test_prometheus_config_scrapes_both_jobs_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {DISPATCHER_JOB, WORKER_JOB}
    dispatcher_targets = jobs[DISPATCHER_JOB]["static_configs"][0]["targets"]
    assert dispatcher_targets == ["127.0.0.1:9464"]
    rule_files = [(PROMETHEUS_CONFIG.parent / path).resolve() for path in config["rule_files"]]
    assert rule_files == [ALERT_RULES.resolve()]


# ---- promtool ---------------------------------------------------------------------------------


@pytest.mark.prometheus
def test_promtool_check_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", ALERT_RULES)


@pytest.mark.prometheus
def test_promtool_rule_unit_tests(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", RULE_TESTS)


@pytest.mark.prometheus
def test_promtool_check_config(promtool: str) -> None:
    run_promtool(promtool, "check", "config", PROMETHEUS_CONFIG)


@pytest.mark.prometheus
def test_promtool_check_metrics_accepts_the_exposition(promtool: str) -> None:
    # promtool's linter: naming conventions, units, help text, counter suffixes.
    exposition = generate_latest(exercised()).decode()
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=exposition,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.prometheus
def test_every_dashboard_expression_parses(promtool: str, tmp_path: Path) -> None:
    queries = [(f"{q.dashboard}/{q.panel_id}/{q.ref_id}", q.expr) for q in dashboard_queries()]
    queries += [(f"variable/{i}", expr) for i, expr in enumerate(variable_queries())]
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard_queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        # promtool names the failing rule by index: say which panel that is.
        index = {f"dashboard:query_{i}": where for i, (where, _) in enumerate(queries)}
        named = re.sub(r"dashboard:query_\d+", lambda m: index[m.group(0)], result.stdout)
        pytest.fail(f"a dashboard query does not parse:\n{named}\n{result.stderr}")
    assert f"{len(rules)} rules found" in result.stdout


@pytest.mark.prometheus
def test_a_broken_expression_fails_the_parse_check(promtool: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.rules.yml"
    rule = {"record": "broken", "expr": "sum by (target (rundispatch_queued_runs)"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, check=False
    )
    assert result.returncode != 0


# ---- a real Prometheus ------------------------------------------------------------------------


@pytest.fixture
def served_dispatcher_metrics() -> Iterator[tuple[DispatcherMetrics, int]]:
    registry = CollectorRegistry()
    dispatcher = DispatcherMetrics(registry)
    with metrics_server(registry, "127.0.0.1", 0) as port:
        yield dispatcher, port


@pytest.mark.integration
def test_serve_metrics_on_port_zero_serves_the_registry(
    served_dispatcher_metrics: tuple[DispatcherMetrics, int],
) -> None:
    dispatcher, port = served_dispatcher_metrics
    assert port > 0
    dispatcher.run_submitted("g:finance", "credentials", "unattended")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert (
        'rundispatch_runs_submitted_total{connection_kind="credentials",mode="unattended",'
        'target="g:finance"} 1.0' in body
    )


@pytest.mark.prometheus
@pytest.mark.timeout(90)
def test_real_prometheus_scrapes_the_metrics_and_fires_the_timeout_alert(
    served_dispatcher_metrics: tuple[DispatcherMetrics, int],
) -> None:
    require(prometheus_binary(), "prometheus")
    dispatcher, port = served_dispatcher_metrics
    dispatcher.set_up(True)
    dispatcher.run_submitted("g:finance", "credentials", "unattended")
    dispatcher.run_submitted("g:finance", "credentials", "unattended")
    dispatcher.run_rejected("g:finance", "credentials", "unattended", "QueueFull")
    dispatcher.dead_letter("schema")
    dispatcher.set_queue_state(
        QueueStateSnapshot(
            now=time.time(),
            queues={("g:finance", "normal"): QueueStats(2, time.time() - 30)},
            waiting={("g:finance", "NoFreeSlot"): 2},
            machines={("finance", "online"): 1},
            slots={"finance": SlotCounts(busy=1, free=0)},
        )
    )
    with prometheus_server({DISPATCHER_JOB: [f"127.0.0.1:{port}"]}) as prom:
        prom.wait_for_targets_up()
        submitted = prom.wait_for(
            lambda: prom.query('rundispatch_runs_submitted_total{target="g:finance"}'),
            what="submitted runs scraped",
        )
        assert [float(series["value"][1]) for series in submitted] == [2.0]
        assert prom.value('sum(rundispatch_runs_rejected_total{code="QueueFull"})') == 1.0
        assert prom.value('max(rundispatch_queued_runs{target="g:finance"})') == 2.0
        assert prom.value('up{job="rundispatch-dispatcher"}') == 1.0
        assert all(rule["health"] == "ok" for rule in prom.rules()), prom.rules()

        # A time-out after the counter was scraped at 0: the time-out alert fires, as a warning
        # (the page is RunsPredictedToTimeOut, before runs time out).
        dispatcher.run_timed_out("g:finance", "credentials", "unattended")
        alerts = prom.wait_for(
            lambda: prom.firing("RunsTimingOutInQueue"), timeout=30, what="alert firing"
        )
        assert alerts[0]["labels"]["target"] == "g:finance"
        assert alerts[0]["labels"]["severity"] == "warning"
        assert not prom.firing("DispatcherDown")

        # Every dashboard query runs without error on the real server.
        errors = {}
        for query in dashboard_queries():
            try:
                prom.query(query.expr)
            except Exception as exc:
                errors[f"{query.dashboard} {query.panel!r} {query.ref_id}"] = str(exc)
        assert not errors
