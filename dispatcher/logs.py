"""Logging set-up: one line per record (text or JSON), with secrets scrubbed on the way out."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

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
