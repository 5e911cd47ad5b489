"""A private redis-server for fault tests: ``deploy/redis/redis.conf`` (AOF, fsync every
second) on its own port and data directory.

The shared Redis on :6379 is never touched; this one can be SIGKILLed and restarted on the
same port and data directory, as a crash of the real store would be.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.support.processes import (
    terminate,
)

REDIS_CONF = Path(__file__).resolve().parents[2] / "deploy" / "redis" / "redis.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.dir = workdir / "redis-data"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def config(self, name: str) -> str:
        client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        try:
            return str(client.config_get(name)[name])
        finally:
            client.close()

    def start(self, timeout: float = 20.0) -> None:
        # The deployment's configuration (AOF, fsync every second), on a private port and dir.
        argv = [
            "redis-server",
            str(REDIS_CONF),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip
        with self.log.open("ab") as output:
            self.proc = subprocess.Popen(
                argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log.read_text()[-2000:]}")
                try:
                    if client.ping():
                        # A restarted server answers LOADING until the AOF is replayed.
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not come up")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync (the page cache keeps what was written)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
