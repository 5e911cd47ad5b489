"""Logging set-up: one line per record (text or JSON), with secrets scrubbed on the way out.

JSON lines carry ``run_id``, ``machine_id`` and ``target`` as fields where they apply: given
to one call (``log.warning(..., extra=fields(run_id=...))``) or bound to the current context
(``bind(machine_id=...)``: a worker binds its machine for the process, a flow's task its run).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar

FIELDS = ("run_id", "machine_id", "target")
_bound: ContextVar[dict[str, str]] = ContextVar("rundispatch_log_fields", default={})  # noqa: B039


def bind(**values: str) -> None:
    """Add fields to every record logged from this context on (this task, the tasks it
    creates later)."""
    _bound.set({**_bound.get(), **{k: v for k, v in values.items() if k in FIELDS}})


def fields(**values: str | None) -> dict[str, str]:
    """Fields for one log call (``extra=``); None values are left out."""
    return {key: value for key, value in values.items() if key in FIELDS and value is not None}


# Anything that looks like a credential in a URL, a bearer token, or a key=value secret.
_PATTERNS = [
    (re.compile(r"(?i)(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (
        re.compile(
            r"(?i)\b(password|secret|token|access_token|refresh_token|client_secret)"
            r"(\"?\s*[:=]\s*\"?)[^\s\",}]+"
        ),
        r"\1\2***",
    ),
]


def scrub(text: str) -> str:
    """Mask credential-shaped substrings (a last line of defence: code never logs secrets)."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class ScrubbingFormatter(logging.Formatter):
    def __init__(self, json_lines: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if self.json_lines:
            payload = {
                "ts": round(time.time(), 3),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            payload.update(_bound.get())
            for name in FIELDS:
                value = getattr(record, name, None)
                if value is not None:
                    payload[name] = str(value)
            if record.exc_info:
                payload["exc"] = self.formatException(record.exc_info)
            return scrub(json.dumps(payload))
        return scrub(super().format(record))


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ScrubbingFormatter(fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "httpx", "httpcore", "msal", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
