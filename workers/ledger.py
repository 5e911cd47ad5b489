"""The worker's local execution ledger: one JSON line per start and per finish, fsynced.

It is how a worker refuses an assignment it already ran (a redelivered message), and the log
that fault tests count executions from.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen: set[str] = set()
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if isinstance(entry, dict) and entry.get("event") == "started":
                    self._seen.add(str(entry.get("run_id")))
        self._file = path.open("a", encoding="utf-8")

    def already_ran(self, run_id: str) -> bool:
        return run_id in self._seen

    def record(self, event: str, run_id: str, fence: int, **extra: Any) -> None:
        """Append and fsync one entry."""
        self.record_many(event, [(run_id, fence, extra)])

    def record_started(self, entries: list[tuple[str, int, dict[str, Any]]]) -> None:
        """Starts are on disk before their flows begin: they are what refuses a redelivered
        assignment even if the store lost its last writes. One fsync per batch, on the event
        loop: handing it to a thread cost more CPU than the fsync itself here (~290 against
        ~100 µs, measured in bench/README.md) and twice the time."""
        self.record_many("started", entries)

    def record_many(
        self, event: str, entries: list[tuple[str, int, dict[str, Any]]], durable: bool = True
    ) -> None:
        """Append several entries, with one fsync when ``durable``."""
        if self._write(event, entries) and durable:
            os.fsync(self._file.fileno())

    def _write(self, event: str, entries: list[tuple[str, int, dict[str, Any]]]) -> bool:
        if not entries:
            return False
        now = time.time()
        lines = []
        for run_id, fence, extra in entries:
            if event == "started":
                self._seen.add(run_id)
            lines.append(
                json.dumps({"at": now, "event": event, "run_id": run_id, "fence": fence, **extra})
            )
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        return True

    def close(self) -> None:
        self._file.close()
