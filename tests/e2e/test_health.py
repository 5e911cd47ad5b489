"""``/healthz`` and ``/readyz`` of a dispatcher and a worker, against real services that go
away and come back: a private Redis (killed and restarted) and RabbitMQ behind a fault proxy
(refusing and resetting connections). ``rundispatch_up`` follows readiness."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.settings import Settings
from tests.support.faultproxy import ProxyProcess
from tests.support.privateredis import PrivateRedis, free_port
from tests.support.processes import Processes, eventually, new_settings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture
def amqp_proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess("127.0.0.1:5672", tmp_path)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def settings(private_redis: PrivateRedis, amqp_proxy: ProxyProcess) -> Settings:
    return new_settings(
        redis_url=private_redis.url,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{amqp_proxy.port}/",
        metrics_port=free_port(),
    )


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError as exc:  # not listening yet
        return 0, str(exc)


async def answer(url: str, status: int, text: str = "", timeout: float = 40) -> str:
    """Wait until ``url`` answers ``status`` with ``text`` in its body; the body."""
    seen: list[tuple[int, str]] = []

    async def check() -> str | None:
        code, body = await asyncio.to_thread(get, url)
        seen[:] = [(code, body)]
        return body if code == status and text in body else None

    try:
        body: str = await eventually(check, timeout=timeout, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{url} never answered {status} {text!r}; last {seen}") from exc
    return body


def up_value(metrics: str) -> float:
    [line] = [x for x in metrics.splitlines() if x.startswith("rundispatch_up ")]
    return float(line.split()[1])


async def up_is(base: str, value: float) -> None:
    async def check() -> bool:
        code, body = await asyncio.to_thread(get, f"{base}/metrics")
        return code == 200 and up_value(body) == value

    await eventually(check, timeout=20, interval=0.2)


@pytest.mark.parametrize("process", ["dispatcher", "worker"])
async def test_readyz_follows_redis_and_rabbitmq_and_healthz_answers(
    process: str,
    settings: Settings,
    procs: Processes,
    private_redis: PrivateRedis,
    amqp_proxy: ProxyProcess,
) -> None:
    base = f"http://127.0.0.1:{settings.metrics_port}"
    if process == "dispatcher":
        procs.dispatcher()
    else:  # a worker speaks only to a dispatcher (over RabbitMQ): one must be there
        procs.dispatcher("dispatcher", "--metrics-port", "0")
        procs.worker("m1", extra=["--metrics-port", str(settings.metrics_port)])
    await answer(f"{base}/readyz", 200, "ready")
    await answer(f"{base}/healthz", 200, "ok")
    if process == "dispatcher":
        await up_is(base, 1)

    private_redis.kill()
    if process == "dispatcher":
        await answer(f"{base}/readyz", 503, "Redis is unreachable")
    else:  # the worker holds no Redis URL: its readiness does not follow Redis
        await answer(f"{base}/readyz", 200, "ready")
    await answer(f"{base}/healthz", 200, "ok")  # the process itself is fine
    if process == "dispatcher":
        await up_is(base, 0)
    private_redis.start()
    await answer(f"{base}/readyz", 200, "ready")
    if process == "dispatcher":
        await up_is(base, 1)

    amqp_proxy.toggle_refuse()
    amqp_proxy.reset_all()
    await answer(f"{base}/readyz", 503, "RabbitMQ is unreachable")
    amqp_proxy.toggle_refuse()
    await answer(f"{base}/readyz", 200, "ready", timeout=60)
    assert (await asyncio.to_thread(get, f"{base}/nothing"))[0] == 404
