"""A small asyncio TCP fault proxy (toxiproxy is not installable here).

It forwards every connection made to its listening port to an upstream address and can break
them on demand:

* ``reset_all()``: abort every open connection on both sides (the peers see a reset);
* ``blackhole``: while set, bytes are read and dropped in both directions (a half-dead peer);
* ``refuse``: while set, new connections are closed at once.

Used in-process (``FaultProxy``) or as its own process, so that forwarding does not compete
with the test's event loop::

    python -m tests.support.faultproxy --upstream 127.0.0.1:5672 --port-file /tmp/p

In process mode SIGUSR1 resets every connection, SIGUSR2 toggles ``refuse``; the listening port
is written to ``--port-file`` once the proxy accepts connections. ``ProxyProcess`` wraps that.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 64 * 1024


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_port = listen_port
        self.blackhole = False
        self.refuse = False
        self.resets = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.listen_port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.reset_all()
            await self._server.wait_closed()
            self._server = None

    def reset_all(self) -> int:
        """Abort every open connection (RST to both peers); returns how many were cut."""
        pairs, self._pairs = self._pairs, set()
        for client, upstream in pairs:
            for writer in (client, upstream):
                _abort(writer)
        self.resets += len(pairs)
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(writer)
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for w in pair:
                with contextlib.suppress(Exception):
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if self.blackhole:
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, like a dropped network path or a killed peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()


# ---- process mode -------------------------------------------------------------------------------
async def _serve(upstream: str, port: int, port_file: Path | None) -> None:
    host, _, up_port = upstream.rpartition(":")
    proxy = FaultProxy(host or "127.0.0.1", int(up_port), port)
    await proxy.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def reset() -> None:
        cut = proxy.reset_all()
        print(f"{time.time():.3f} reset {cut} connections", flush=True)

    def toggle_refuse() -> None:
        proxy.refuse = not proxy.refuse
        print(f"{time.time():.3f} refuse={proxy.refuse}", flush=True)

    loop.add_signal_handler(signal.SIGUSR1, reset)
    loop.add_signal_handler(signal.SIGUSR2, toggle_refuse)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(proxy.port))
        os.replace(tmp, port_file)
    print(f"{time.time():.3f} proxy 127.0.0.1:{proxy.port} -> {upstream}", flush=True)
    await stop.wait()
    await proxy.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faultproxy")
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 = any)")
    parser.add_argument("--port-file", type=Path, default=None)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.upstream, args.port, args.port_file))
    return 0


class ProxyProcess:
    """The proxy as a child process: ``reset_all()`` and ``stop()`` from the test."""

    def __init__(self, upstream: str, workdir: Path) -> None:
        self.upstream = upstream
        self.workdir = workdir
        self.log = workdir / "faultproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.resets = 0

    def start(self, timeout: float = 20.0) -> int:
        port_file = self.workdir / "faultproxy.port"
        port_file.unlink(missing_ok=True)
        repo = Path(__file__).resolve().parents[2]
        with self.log.open("ab") as output:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.faultproxy",
                    "--upstream",
                    self.upstream,
                    "--port-file",
                    str(port_file),
                ],
                cwd=repo,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fault proxy did not start: {self.log.read_text()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    def reset_all(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "proxy is not running"
        self.proc.send_signal(signal.SIGUSR1)
        self.resets += 1

    def connections_reset(self) -> list[int]:
        """How many connections each reset so far actually cut (from the proxy's own log)."""
        counts = []
        for line in self.log.read_text(errors="replace").splitlines():
            words = line.split()
            if len(words) == 4 and words[1] == "reset" and words[3] == "connections":
                counts.append(int(words[2]))
        return counts

    def toggle_refuse(self) -> None:
        """Refuse new connections from now on, or accept them again."""
        assert self.proc is not None and self.proc.poll() is None, "proxy is not running"
        self.proc.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        # Not at import: the proxy process stays light.
        from tests.support.processes import terminate

        if self.proc is not None:
            terminate(self.proc)


if __name__ == "__main__":
    raise SystemExit(main())
