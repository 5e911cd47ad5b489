"""Every Prometheus configuration in the repository passes `promtool check config` (which also
checks the rule files it loads), and scrapes under the job names the alert rules expect."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .tools import DEPLOY, REPO, require_tool, run

pytestmark = pytest.mark.deploy

# The plain host setup, the Compose stack's and the Kubernetes one.
CONFIGS = sorted((DEPLOY / "prometheus").glob("*.yml"))
JOBS = {"rundispatch-dispatcher", "rundispatch-worker"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "apt-get install prometheus: make tools")


def test_the_three_configurations_are_found() -> None:
    assert {p.name for p in CONFIGS} >= {"prometheus.yml", "compose.yml", "kubernetes.yml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_promtool_check_config(promtool: str, config: Path) -> None:
    result = run(promtool, "check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_configuration(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("scrape_configs:\n  - job_name: x\n    static_config: []\n")
    assert run(promtool, "check", "config", broken).returncode != 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_jobs_and_rules_are_the_ones_the_alerts_use(config: Path) -> None:
    document = yaml.safe_load(config.read_text())
    assert {job["job_name"] for job in document["scrape_configs"]} >= JOBS
    rules = [(config.parent / path).resolve() for path in document["rule_files"]]
    assert rules == [REPO / "dashboards" / "alerts.rules.yml"]
