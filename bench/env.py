"""The bench's environment: a private namespace, child processes, CPU accounting, clean-up.

Everything the bench creates lives under one namespace ``bench<hex>``: Redis keys
``<ns>:*`` and AMQP names ``<ns>.*``. :func:`cleanup` deletes all of them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import redis.asyncio as aioredis

from dispatcher.names import Names
from dispatcher.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def new_settings(**overrides: Any) -> Settings:
    """Production defaults, except: a private namespace, a fresh secret key, no throttle and
    no queue cap (the bench submits thousands of runs a minute on one connection), metrics on
    any free port."""
    values: dict[str, Any] = {
        "namespace": f"bench{uuid.uuid4().hex[:8]}",
        "secret_keys": f"bench:{base64.b64encode(os.urandom(32)).decode()}",
        "throttle_per_minute": 1_000_000_000,
        "queue_cap": 10_000_000,
        "log_level": "WARNING",
        "metrics_port": 0,  # metrics on, as deployed; any free port, so replicas can coexist
    }
    values.update(overrides)
    return Settings.load(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess exactly these settings (as the tests do)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNDISPATCH_")}
    env.update(settings.as_environment())
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---- processes ------------------------------------------------------------------------------
@dataclass
class Procs:
    """Child processes of one bench run; each in its own session, stopped by its pid only."""

    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as output:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO,
                env=env or self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def pids(self, prefix: str) -> list[int]:
        return [p.pid for n, p in self.procs.items() if n.startswith(prefix) and p.poll() is None]

    def check_alive(self, *names: str) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                log = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"process {name} is not running; its log ends:\n{log}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


# ---- clean-up -------------------------------------------------------------------------------
async def delete_keys(redis: aioredis.Redis, pattern: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=pattern, count=2000):
        batch.append(key)
        if len(batch) >= 2000:
            deleted += await redis.unlink(*batch)
            batch = []
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


async def cleanup(
    settings: Settings, queues: Iterable[str] = (), exchanges: Iterable[str] = ()
) -> dict[str, int]:
    """Delete every Redis key of the namespace, the product's AMQP entities and the extra
    ``queues`` / ``exchanges`` the bench declared (machine queues, the baseline's)."""
    names = Names(settings.namespace)
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        keys = await delete_keys(redis, names.pattern())
    finally:
        await redis.aclose()
    all_queues = [
        names.requests_queue,
        names.dead_queue,
        names.heartbeats_queue,
        names.signals_queue,
        names.reports_queue,
        *queues,
    ]
    all_exchanges = [
        names.requests_exchange,
        names.events_exchange,
        names.dead_exchange,
        names.machines_exchange,
        names.heartbeats_exchange,
        names.reports_exchange,
        *exchanges,
    ]
    deleted_queues = await delete_queues(settings, all_queues)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        for exchange in dict.fromkeys(all_exchanges):
            channel = await connection.channel()
            try:
                await channel.exchange_delete(exchange)
            except Exception:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return {"redis_keys": keys, "queues": deleted_queues}


async def delete_queues(settings: Settings, queues: Iterable[str]) -> int:
    """Delete ``queues`` (those never declared are skipped); how many were deleted."""
    deleted = 0
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        for queue in dict.fromkeys(queues):
            channel = await connection.channel()
            try:
                await channel.queue_delete(queue)
                deleted += 1
            except Exception:
                pass  # never declared
            finally:
                if not channel.is_closed:
                    await channel.close()
    finally:
        await connection.close()
    return deleted


async def leftovers(settings: Settings) -> int:
    """How many Redis keys of the namespace are left (0 after a clean run)."""
    redis = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        return len([k async for k in redis.scan_iter(match=Names(settings.namespace).pattern())])
    finally:
        await redis.aclose()


async def require_rabbitmq_files(settings: Settings, plans: dict[str, tuple[int, int]]) -> None:
    """Stop before a section whose machine queues would use up RabbitMQ's files for queues.

    ``plans``: the files each section's queues will hold, at least and at most (see
    ``node_files``: a quorum queue holds its files from its declaration, a classic queue once
    it stored a message); each section deletes its queues before the next. Past the budget
    the node stops confirming publishes: the bench would hang in that section instead. Only
    a warning when just the upper bound does not fit."""
    from dispatcher.adapters.amqp.node_files import read_node_files
    from dispatcher.errors import DispatchError

    if not plans:
        return
    try:
        files = await read_node_files(settings.broker_admin_url.get_secret_value())
    except DispatchError as exc:
        print(f"RabbitMQ's open-file limit not checked: {exc}", flush=True)
        return
    free = files.budget - files.needed
    for section, (at_least, at_most) in plans.items():
        text = (
            f"the {section} section needs ~{at_least if at_least > free else at_most} of "
            f"RabbitMQ's files for queues, the node has {free} free (open-file limit "
            f"{files.open_file_limit}, {files.quorum_queues} quorum and "
            f"{files.classic_queues} classic queues already). Raise the limit and restart "
            "RabbitMQ (as root: su rabbitmq -s /bin/sh -c 'ulimit -n 65536 && rabbitmq-server "
            "-detached', or LimitNOFILE= in its systemd unit), or run fewer machines (--fleet, "
            '--live-fleet); bench/README.md, "RabbitMQ\'s file handles".'
        )
        if at_least > free:
            raise SystemExit(text)
        if at_most > free:
            print(f"warning: {text}", flush=True)
