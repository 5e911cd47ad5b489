"""Shared fixtures: a private namespace, the real services, and the product's processes."""

from __future__ import annotations

import gc
import json
import os
import warnings
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from dispatcher.client import Client
from dispatcher.settings import Settings
from tests.support.privateredis import PrivateRedis
from tests.support.processes import (
    Processes,
    cleanup,
    new_settings,
)

# Hypothesis profiles, explicit: ``dev`` (the default), ``ci`` (under CI: more examples),
# ``mutation`` (``make mutation``: fewer examples, derandomized so that whether a mutant is
# killed does not depend on the draw, and a score can be reproduced) and ``thorough`` (by hand:
# HYPOTHESIS_PROFILE=thorough). Every profile prints the reproduction
# blob of a failure (``@reproduce_failure``), so a failure seen once can be replayed.
hypothesis_settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
hypothesis_settings.register_profile("ci", max_examples=400, deadline=None, print_blob=True)
hypothesis_settings.register_profile(
    "mutation", max_examples=100, deadline=None, print_blob=True, derandomize=True
)
hypothesis_settings.register_profile("thorough", max_examples=5000, deadline=None, print_blob=True)
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)


@pytest.fixture
def settings() -> Settings:
    return new_settings()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client.connect(settings) as c:
        yield c
    await cleanup(settings, machine_ids=_machine_ids(settings))


_MACHINES: dict[str, list[str]] = {}


def _machine_ids(settings: Settings) -> list[str]:
    return _MACHINES.get(settings.namespace, [])


@pytest.fixture
def procs(settings: Settings, tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(settings, tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture
def apply_fleet(settings: Settings, tmp_path: Path, procs: Processes):  # type: ignore[no-untyped-def]
    """Write a fleet file and apply it with the real CLI."""
    import subprocess
    import sys

    def apply(document: dict[str, Any], *extra: str) -> None:
        path = tmp_path / "fleet.json"
        path.write_text(json.dumps(document))
        _MACHINES[settings.namespace] = [m["machine_id"] for m in document.get("machines", [])]
        result = subprocess.run(
            [sys.executable, "-m", "dispatcher", "apply", str(path), *extra],
            env=procs.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    return apply


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A redis-server of the test's own (tests/support/privateredis.py), for tests that stop,
    break or fill Redis; stopped at the end."""
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    """After a test that breaks Redis or RabbitMQ (``chaos``, ``cluster``), once its event loop
    is closed: collect the connections its calls lost, quietly.

    redis-py reports a connection that a call never gave back to its pool (the call was
    cancelled by a time-out while the store was down, as these tests do on purpose) when the
    garbage collector finds it: a ResourceWarning, an error here. Left alone, it fails
    whichever later test happens to trigger a collection, with nothing of its own wrong."""
    yield
    if item.get_closest_marker("chaos") or item.get_closest_marker("cluster"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
