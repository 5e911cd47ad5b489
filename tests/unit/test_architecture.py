"""The shape of the code base: only adapters touch RabbitMQ, Redis, HTTP and msal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"aio_pika", "aiormq", "redis", "httpx", "msal"}
ADAPTER_DIRS = (REPO / "dispatcher" / "adapters", REPO / "workers" / "adapters")
# Composition roots and process entry points wire adapters together; they may only import
# adapters, never the libraries themselves, so they are checked like everything else.
PACKAGES = (REPO / "dispatcher", REPO / "workers")

pytestmark = pytest.mark.unit


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


def product_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in package.rglob("*.py"))


def test_only_adapters_import_io_libraries() -> None:
    offenders = {}
    for path in product_modules():
        if any(path.is_relative_to(d) for d in ADAPTER_DIRS):
            continue
        bad = imported_modules(path) & FORBIDDEN
        if bad:
            offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert offenders == {}


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("import redis.asyncio as r\nfrom httpx import Client\n")
    assert imported_modules(sample) & FORBIDDEN == {"redis", "httpx"}


def test_dispatcher_never_imports_workers() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "dispatcher").rglob("*.py")
        if "workers" in imported_modules(p)
    ]
    assert offenders == []


def test_core_is_pure() -> None:
    io_modules = FORBIDDEN | {"asyncio", "socket", "subprocess", "prometheus_client"}
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_modules(p) & io_modules)
        for p in (REPO / "dispatcher" / "core").rglob("*.py")
        if imported_modules(p) & io_modules
    }
    assert offenders == {}
