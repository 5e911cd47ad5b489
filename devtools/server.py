"""The base of the local HTTPS services: a threaded TLS server, counters, injected failures,
and an admin API, so that a test in-process or a demo in another process can drive them.

Admin API (every service): ``POST /_admin/<action>`` with a JSON object of keyword arguments
answers ``{"result": ...}``; ``GET /_admin/counters`` answers the request counters. Actions are
the methods listed in ``admin_actions`` (plus ``counters``, ``reset_counters``, ``fail_next``,
``set_latency``). :class:`AdminClient` calls it from another process.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import parse_qsl, urlsplit

from devtools.tls import CERT_FILE, client_context, server_context

BASE_ACTIONS = frozenset({"counters", "reset_counters", "fail_next", "set_latency"})


@dataclass(frozen=True)
class Request:
    """One HTTP request, already read (headers lower-cased)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def form(self) -> dict[str, str]:
        """The body as ``application/x-www-form-urlencoded`` fields."""
        return dict(parse_qsl(self.body.decode("utf-8"), keep_blank_values=True))

    def json(self) -> Any:
        """The body as JSON (an empty body is an empty object)."""
        return json.loads(self.body) if self.body else {}


@dataclass
class Reply:
    """One HTTP response."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    """A JSON response."""
    return Reply(status, json.dumps(payload).encode(), headers=headers or {})


def html_reply(status: int, html: str, headers: dict[str, str] | None = None) -> Reply:
    """An HTML response (user-facing pages, proxy error pages)."""
    return Reply(status, html.encode(), "text/html; charset=utf-8", headers or {})


Handler = Callable[[Request], Reply]


@dataclass
class _Failure:
    status: int
    retry_after: int | None
    html: bool


class LocalService:
    """Base of a local HTTPS service; subclasses implement :meth:`route` and :meth:`error_reply`."""

    admin_actions: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, cert_dir: str | Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cert_dir = Path(cert_dir)
        self.lock = threading.RLock()
        self._counters: Counter[str] = Counter()
        self._failures: dict[str, deque[_Failure]] = {}
        self._latency: dict[str, float] = {}
        self._server = _TlsServer((host, port), _RequestHandler, server_context(cert_dir), self)
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, e.g. ``https://127.0.0.1:8443`` (no trailing slash)."""
        host, port = self._server.server_address[:2]
        return f"https://{host!s}:{port}"

    @property
    def ca_file(self) -> str:
        """The certificate clients must trust (``settings.idp_ca_file``)."""
        return str(self.cert_dir / CERT_FILE)

    def start(self) -> Self:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},  # stop() returns within 50 ms
            name=type(self).__name__,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections."""
        self._server.shutdown()
        self._server.server_close()
        self._server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- counters and failures --------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Requests served so far, per endpoint name."""
        with self.lock:
            return dict(self._counters)

    def reset_counters(self) -> None:
        """Start counting from zero."""
        with self.lock:
            self._counters.clear()

    def fail_next(
        self,
        count: int = 1,
        status: int = 503,
        endpoint: str = "*",
        retry_after: int | None = None,
        html: bool = False,
    ) -> None:
        """Answer the next ``count`` requests to ``endpoint`` (``*`` = any) with ``status``."""
        with self.lock:
            queue = self._failures.setdefault(endpoint, deque())
            queue.extend(_Failure(status, retry_after, html) for _ in range(count))

    def set_latency(self, seconds: float, endpoint: str = "*") -> None:
        """Delay every answer of ``endpoint`` (``*`` = any) by ``seconds``."""
        with self.lock:
            self._latency[endpoint] = float(seconds)

    # ---- for subclasses ---------------------------------------------------------------------
    def route(self, request: Request) -> tuple[str, Handler] | None:
        """The endpoint name (for counters and failures) and handler of ``request``."""
        raise NotImplementedError

    def error_reply(self, status: int, retry_after: int | None) -> Reply:
        """The service's own error body for an injected failure."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return json_reply(status, {"error": "injected failure"}, headers)

    # ---- dispatch ---------------------------------------------------------------------------
    def dispatch(self, request: Request) -> Reply:
        """Serve one request: admin API, or count, delay, maybe fail, then route."""
        if request.path.startswith("/_admin/"):
            return self._admin(request)
        found = self.route(request)
        if found is None:
            return json_reply(404, {"error": "not_found", "path": request.path})
        endpoint, handler = found
        with self.lock:
            self._counters[endpoint] += 1
            delay = self._latency.get(endpoint, self._latency.get("*", 0.0))
            failure = self._pop_failure(endpoint)
        if delay:
            time.sleep(delay)
        if failure is not None:
            if failure.html:
                return html_reply(failure.status, "<html><body>Bad gateway</body></html>")
            return self.error_reply(failure.status, failure.retry_after)
        return handler(request)

    def _pop_failure(self, endpoint: str) -> _Failure | None:
        for key in (endpoint, "*"):
            queue = self._failures.get(key)
            if queue:
                return queue.popleft()
        return None

    def _admin(self, request: Request) -> Reply:
        action = request.path.removeprefix("/_admin/")
        if action not in BASE_ACTIONS | self.admin_actions:
            return json_reply(404, {"error": f"unknown admin action {action!r}"})
        try:
            kwargs = request.json() if request.method == "POST" else dict(request.query)
            result = getattr(self, action)(**kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            return json_reply(400, {"error": f"{type(exc).__name__}: {exc}"})
        return json_reply(200, {"result": result})


class AdminError(Exception):
    """The service refused an admin call (unknown action or bad arguments)."""


class AdminClient:
    """Calls a local service's admin API from another process (stdlib only)."""

    def __init__(self, url: str, ca_file: str | Path) -> None:
        self.url = url.rstrip("/")
        self._context = client_context(ca_file)

    def call(self, action: str, **kwargs: Any) -> Any:
        """Run ``action`` with ``kwargs`` on the service and return its result."""
        request = urllib.request.Request(
            f"{self.url}/_admin/{action}",
            data=json.dumps(kwargs).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, context=self._context, timeout=10) as response:
                return json.loads(response.read())["result"]
        except urllib.error.HTTPError as exc:
            with exc:
                raise AdminError(json.loads(exc.read()).get("error", str(exc))) from None


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as msal's and httpx's clients expect
    disable_nagle_algorithm = True  # otherwise Nagle + delayed ACK add ~40 ms per request
    server: _TlsServer

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={key.lower(): value for key, value in self.headers.items()},
            body=body,
        )
        try:
            reply = self.server.service.dispatch(request)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            reply = json_reply(500, {"error": "server_error"})
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log: request lines may carry codes and secrets."""


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        service: LocalService,
    ) -> None:
        super().__init__(address, handler)
        self.handler_class = handler
        self.context = context
        self.service = service
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, so that one slow client
        # cannot stall the accept loop.
        try:
            connection = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self._open_lock:
            self._open.add(connection)
        try:
            self.handler_class(connection, client_address, self)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass  # the client went away; nothing to answer
        finally:
            with self._open_lock:
                self._open.discard(connection)
            connection.close()

    def drop_connections(self) -> None:
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by its own thread
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        traceback.print_exc(file=sys.stderr)


def serve_until_interrupted(service: LocalService, info: dict[str, Any]) -> int:
    """Serve ``service`` until SIGINT/SIGTERM, after printing ``info`` as one JSON line.

    The JSON line (``url``, ``ca_file``, ...) is what a parent process reads to find it.
    """
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with service:
        print(json.dumps(info), flush=True)
        stop.wait()
    return 0
