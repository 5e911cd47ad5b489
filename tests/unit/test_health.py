"""The probes' server in process: ``/healthz`` asks the event loop itself, so a blocked loop
answers 503 (a thread serving ``/metrics`` alone would keep answering 200)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from dispatcher.metrics import health
from dispatcher.metrics.health import Readiness, serve_health

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def test_healthz_is_503_while_the_event_loop_is_blocked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(health, "HEALTH_TIMEOUT_S", 0.3)
    server = serve_health(CollectorRegistry(), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.port}/healthz"
    try:
        assert await asyncio.to_thread(status, url) == (200, "ok\n")
        answers: list[tuple[int, str]] = []
        probe = threading.Thread(target=lambda: answers.append(status(url)))
        probe.start()
        time.sleep(1.5)  # noqa: ASYNC251 - blocks the event loop on purpose
        probe.join(timeout=10)
        assert answers and answers[0][0] == 503, answers
        assert "did not answer" in answers[0][1]
    finally:
        server.close()


async def test_readyz_runs_the_check_on_the_loop_and_reports_it() -> None:
    seen: list[bool] = []
    server = serve_health(CollectorRegistry(), "127.0.0.1", 0, on_ready=seen.append)
    base = f"http://127.0.0.1:{server.port}"
    ready = Readiness(False, "Redis is unreachable")

    async def check() -> Readiness:
        return ready

    try:
        assert await asyncio.to_thread(status, f"{base}/readyz") == (503, "not ready: starting\n")
        server.probes.check = check
        code, body = await asyncio.to_thread(status, f"{base}/readyz")
        assert (code, body) == (503, "not ready: Redis is unreachable\n")
        ready = Readiness(True)
        assert await asyncio.to_thread(status, f"{base}/readyz") == (200, "ready\n")
        assert await asyncio.to_thread(status, f"{base}/healthz") == (200, "ok\n")
        assert seen == [False, False, True]
    finally:
        server.close()
