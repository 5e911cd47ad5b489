"""Fixtures for the cluster tests: a private 3-node RabbitMQ cluster (one per test module) and
a private Redis primary + replica + 3 Sentinels (one per test, since every test switches it
over). Both come from ``deploy/local/``; nothing here touches the shared broker or Redis.

The timings the tests measure (boot, failover, stalls) are printed at the end of the run.
"""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEPLOY_LOCAL = Path(__file__).resolve().parents[2] / "deploy" / "local"
TIMINGS: dict[str, str] = {}


def _load(name: str) -> ModuleType:
    """Import a script of deploy/local (not a package: it runs before any virtualenv)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, DEPLOY_LOCAL / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rabbitmq_cluster = _load("rabbitmq_cluster")
redis_sentinel = _load("redis_sentinel")


def record(what: str, value: float | int | str, unit: str = "s") -> None:
    """Keep a measured figure for the summary at the end of the run."""
    text = f"{value:.2f} {unit}" if isinstance(value, float) else f"{value} {unit}".strip()
    TIMINGS[what] = text


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("cluster timings")
        for what, value in TIMINGS.items():
            terminalreporter.write_line(f"{what}: {value}")


@pytest.fixture(scope="module")
def cluster_of_module() -> Iterator[Any]:
    """One cluster for a test module (not the session: idle, three nodes would still take
    memory and CPU from every test that runs after them)."""
    cluster = rabbitmq_cluster.RabbitCluster(3)
    cluster.start()
    record("rabbitmq: 3-node cluster up (boot + join + management)", cluster.boot_s)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(cluster_of_module: Any) -> Any:
    """The session's cluster with all three nodes running (a test that stopped one left it
    down; it is started again here, before the next test needs it)."""
    for name in cluster_of_module.names:
        if not cluster_of_module.is_running(name):
            took = cluster_of_module.start_node(name)
            record("rabbitmq: a stopped node restarted and rejoined", took)
    return cluster_of_module


@pytest.fixture
def queue_name() -> str:
    return f"clustertest.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def sentinel_group() -> Iterator[Any]:
    group = redis_sentinel.RedisSentinelGroup()
    group.start()
    record("redis: primary + replica + 3 Sentinels up", group.boot_s)
    try:
        yield group
    finally:
        group.stop()
