"""The machine's sessions, from a sessions file re-read at every heartbeat.

On a real machine this would come from the session manager; the file keeps the worker
portable and testable: ``[{"user": "CONTOSO\\\\alice", "state": "active"}]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from dispatcher.models import Session

log = logging.getLogger(__name__)
_SESSIONS = TypeAdapter(tuple[Session, ...])


class SessionsFile:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime: float | None = None
        self._sessions: tuple[Session, ...] = ()

    def changed(self) -> bool:
        """True when the file changed since the last read."""
        if self.path is None:
            return False
        try:
            mtime = self.path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            mtime = -1.0
        return mtime != self._mtime

    def read(self) -> tuple[Session, ...]:
        """The current sessions; a broken file keeps the last good ones (and says so)."""
        if self.path is None:
            return ()
        try:
            self._mtime = self.path.stat().st_mtime_ns / 1e9
            raw = self.path.read_text(encoding="utf-8")
            self._sessions = _SESSIONS.validate_python(json.loads(raw), strict=False)
        except FileNotFoundError:
            self._mtime = -1.0
            self._sessions = ()
        except (ValueError, ValidationError) as exc:
            log.error("sessions file %s is invalid, keeping the last good one: %s", self.path, exc)
        return self._sessions
