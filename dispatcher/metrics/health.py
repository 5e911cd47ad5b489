"""``/metrics``, ``/healthz`` and ``/readyz`` of a dispatcher or a worker, on one port.

Served from a daemon thread (so that ``/metrics`` still answers while the process is busy),
but the two probes ask the event loop itself:

* ``/healthz``: 200 when the event loop runs a no-op within ``HEALTH_TIMEOUT_S``, 503 when it
  is blocked (a hung loop is what a liveness probe must see; a thread alone would not);
* ``/readyz``: 200 when the process's readiness check (run on the loop) says every dependency
  is reachable and its consumers run, 503 with the reason otherwise (or while draining).

Every readiness answer also sets ``rundispatch_up`` (dispatchers) through ``on_ready``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 4.0


@dataclass(frozen=True, slots=True)
class Readiness:
    """What a readiness check found: ready, or the first reason it is not."""

    ready: bool
    reason: str = ""


ReadyCheck = Callable[[], Awaitable[Readiness]]


async def _noop() -> None:
    return None


class Probes:
    """The probes of one process: its event loop and its readiness check."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        check: ReadyCheck | None = None,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self.loop = loop
        self.check = check
        self.on_ready = on_ready

    def alive(self) -> tuple[bool, str]:
        """Whether the event loop answers (called from the server's thread)."""
        future = asyncio.run_coroutine_threadsafe(_noop(), self.loop)
        try:
            future.result(timeout=HEALTH_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False, f"the event loop did not answer within {HEALTH_TIMEOUT_S:g} s"
        except RuntimeError as exc:  # the loop is closed
            return False, f"the event loop is not running: {exc}"
        return True, "ok"

    def ready(self) -> Readiness:
        """The readiness check, run on the event loop (called from the server's thread)."""
        if self.check is None:
            answer = Readiness(False, "starting")
        else:
            future = asyncio.run_coroutine_threadsafe(_checked(self.check), self.loop)
            try:
                answer = future.result(timeout=READY_TIMEOUT_S)
            except concurrent.futures.TimeoutError:
                future.cancel()
                answer = Readiness(False, "the readiness check did not finish in time")
            except RuntimeError as exc:
                answer = Readiness(False, f"the event loop is not running: {exc}")
        if self.on_ready is not None:
            self.on_ready(answer.ready)
        return answer


async def _checked(check: ReadyCheck) -> Readiness:
    try:
        return await check()
    except Exception as exc:  # a check that fails says "not ready", never a 500
        return Readiness(False, f"readiness check failed: {type(exc).__name__}: {exc}")


def _handler(registry: CollectorRegistry, probes: Probes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, reason = probes.alive()
                self._answer(200 if ok else 503, (reason + "\n").encode())
            elif path == "/readyz":
                answer = probes.ready()
                text = "ready" if answer.ready else f"not ready: {answer.reason}"
                self._answer(200 if answer.ready else 503, (text + "\n").encode())
            else:
                self._answer(404, b"not found: /metrics, /healthz, /readyz\n")

        def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None  # probes every few seconds would flood the log

    return Handler


class HealthServer:
    """The HTTP server of one process; ``probes.check`` may be set once the process runs."""

    def __init__(self, registry: CollectorRegistry, probes: Probes, host: str, port: int) -> None:
        self.probes = probes
        self._server = ThreadingHTTPServer((host, port), _handler(registry, probes))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_health(
    registry: CollectorRegistry,
    host: str,
    port: int,
    on_ready: Callable[[bool], None] | None = None,
) -> HealthServer:
    """Serve ``/metrics``, ``/healthz``, ``/readyz`` for the running event loop."""
    probes = Probes(asyncio.get_running_loop(), None, on_ready)
    return HealthServer(registry, probes, host, port)
