"""The process harness: a private namespace per test, the product's processes, clean-up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from dispatcher.adapters.amqp.broker import Amqp
from dispatcher.bootstrap import purge_namespace
from dispatcher.models import Session
from dispatcher.names import Names
from dispatcher.settings import Settings

REPO = Path(__file__).resolve().parents[2]
NOWHERE = "redis://127.0.0.1:9/15"  # the discard port: nothing answers there

FAST = {
    "heartbeat_interval_s": 0.3,
    "metrics_port": 0,
    "offline_after_s": 2.0,
    "running_grace_s": 2.0,
    "sweep_interval_s": 0.2,
    "resweep_interval_s": 1.0,
    "outbox_relay_after_s": 2.0,
    "log_level": "INFO",
    "throttle_per_minute": 100_000,
    "drain_s": 5.0,
    "worker_grace_s": 3.0,
}


def new_settings(**overrides: Any) -> Settings:
    """Settings for one test: its own namespace, fast timings, a fresh secret key."""
    key = base64.b64encode(os.urandom(32)).decode()
    values: dict[str, Any] = {
        "namespace": f"t{uuid.uuid4().hex[:10]}",
        "secret_keys": f"test:{key}",
        **FAST,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNDISPATCH_")}
    env.update(settings.as_environment())
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def cleanup(settings: Settings, machine_ids: list[str] | None = None) -> None:
    """Delete every Redis key and AMQP entity of the namespace."""
    await purge_namespace(settings, list(machine_ids or []))


@contextlib.asynccontextmanager
async def connected_amqp(
    machine_ids: list[str], **options: Any
) -> AsyncIterator[tuple[Amqp, Names, str]]:
    """The broker adapter on a new namespace, connected (``options`` go to ``Amqp``); its
    names and the broker's URL. The namespace (with ``machine_ids``' queues) is deleted
    afterwards."""
    settings = new_settings()
    names = Names(settings.namespace)
    url = settings.amqp_url.get_secret_value()
    amqp = Amqp(url, names, **options)
    try:
        await amqp.connect()
        yield amqp, names, url
    finally:
        await amqp.close()
        await cleanup(settings, machine_ids)


def sessions_json(sessions: Sequence[Session | dict[str, str]]) -> str:
    """A worker's sessions file (``--sessions-file``) listing ``sessions``."""
    return json.dumps(
        [s.model_dump(mode="json") if isinstance(s, Session) else s for s in sessions]
    )


class Processes:
    """Starts dispatcher and worker processes for one test and stops them all."""

    def __init__(self, settings: Settings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.env = settings_env(settings)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.identities: dict[str, str] = {}

    def identity(self, machine_id: str) -> str:
        """The AMQP URL of the machine's own broker identity, registered (once per test) with
        ``machines register`` as an operator would."""
        if machine_id not in self.identities:
            result = subprocess.run(
                [sys.executable, "-m", "dispatcher", "machines", "register", machine_id, "--json"],
                cwd=REPO,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if result.returncode != 0:
                raise AssertionError(
                    f"machines register {machine_id} failed: {result.stdout}{result.stderr}"
                )
            self.identities[machine_id] = json.loads(result.stdout)["amqp_url"]
        return self.identities[machine_id]

    def _start(
        self, name: str, argv: list[str], extra_env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        env = dict(self.env)
        env.update(extra_env or {})
        with log.open("ab") as output:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def dispatcher(
        self, name: str = "dispatcher", *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self._start(name, ["-m", "dispatcher", "serve", *extra], env)

    def worker(
        self,
        machine_id: str,
        *,
        sessions: Sequence[Session | dict[str, str]] | None = None,
        executor: str = "simulate",
        extra: list[str] | None = None,
        name: str | None = None,
        amqp_url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """A machine worker under its machine's own broker identity (registered on first use;
        ``amqp_url``: another one), with no Redis URL it could use; ``env``: more variables."""
        argv = [
            "-m",
            "workers",
            "serve",
            "--machine-id",
            machine_id,
            "--executor",
            executor,
            "--state-dir",
            str(self.state_dir(machine_id)),
        ]
        if sessions is not None:
            path = self.sessions_file(machine_id)
            path.write_text(sessions_json(sessions))
            argv += ["--sessions-file", str(path)]
        argv += extra or []
        # Workers speak only AMQP: a Redis URL that points nowhere proves they never use it.
        variables = {
            **(env or {}),
            "RUNDISPATCH_REDIS_URL": NOWHERE,
            "RUNDISPATCH_AMQP_URL": amqp_url or self.identity(machine_id),
        }
        return self._start(name or f"worker-{machine_id}", argv, variables)

    def state_dir(self, machine_id: str) -> Path:
        return self.workdir / f"state-{machine_id}"

    def sessions_file(self, machine_id: str) -> Path:
        return self.workdir / f"sessions-{machine_id}.json"

    def set_sessions(self, machine_id: str, sessions: Sequence[Session | dict[str, str]]) -> None:
        path = self.sessions_file(machine_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(sessions_json(sessions))
        os.replace(tmp, path)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def executions(self) -> list[dict[str, Any]]:
        """Every execution start recorded by any worker's ledger."""
        entries = []
        for ledger in self.workdir.glob("state-*/ledger.jsonl"):
            machine = ledger.parent.name.removeprefix("state-")
            for line in ledger.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == "started":
                    entry["machine"] = machine
                    entries.append(entry)
        return entries


def terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM a process we started, SIGKILL it if it does not stop in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def eventually(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Wait until ``predicate()`` (sync or async) is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
