"""A minimal synchronous Redis (RESP2) client for the local harnesses: one command per
connection, enough to drive servers and Sentinels before any virtual environment exists."""

from __future__ import annotations

import socket
from typing import Any, BinaryIO

HOST = "127.0.0.1"


class RespError(Exception):
    """An error reply from Redis (``-ERR ...``)."""


def command(port: int, *args: str | int, timeout: float = 5.0) -> Any:
    """Send one command to the Redis (or Sentinel) on ``port`` and return its decoded reply."""
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = str(arg).encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection((HOST, port), timeout) as sock:
        sock.sendall(payload)
        return _read_reply(sock.makefile("rb"))


def _read_reply(reader: BinaryIO) -> Any:
    line = reader.readline()
    if not line:
        raise ConnectionError("connection closed before a reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode(errors="replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line!r}")


def info(port: int, section: str = "replication") -> dict[str, str]:
    """``INFO section`` as a dict."""
    pairs = (line.split(":", 1) for line in str(command(port, "INFO", section)).splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def pairs(flat: list[Any]) -> dict[str, str]:
    """A flat ``[key, value, key, value...]`` reply (Sentinel's) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def answers(port: int) -> bool:
    try:
        return bool(command(port, "PING", timeout=0.5) == "PONG")
    except (OSError, RespError):
        return False
