"""The worker's local execution ledger: one JSON line per start and per finish, fsynced.

It is how a worker refuses an assignment it already ran (a redelivered message), and the log
that fault tests count executions from.

Bounded: when the file grows past ``max_bytes`` (and at start-up), it is rewritten with only
the starts of the last ``keep_s`` seconds (the retention of runs: an older run is gone from the
store, whose fenced start refuses it anyway), atomically (a new file, fsynced, renamed).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

MAX_BYTES = 64 * 1024 * 1024
KEEP_S = 7 * 24 * 3600.0


class Ledger:
    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, keep_s: float = KEEP_S) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen: set[str] = set()
        self._starts: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if isinstance(entry, dict) and entry.get("event") == "started":
                    self._seen.add(str(entry.get("run_id")))
                    self._starts.append(entry)
        self._file = path.open("a", encoding="utf-8")
        self._compact_at = max_bytes
        if path.stat().st_size > max_bytes:
            self.compact()

    def compact(self) -> None:
        """Rewrite the file with the starts of the last ``keep_s`` seconds only."""
        cutoff = time.time() - self.keep_s
        kept = [
            e for e in self._starts if isinstance(e.get("at"), int | float) and e["at"] >= cutoff
        ]
        fresh = self.path.with_suffix(".compacting")
        with fresh.open("w", encoding="utf-8") as out:
            out.write("".join(json.dumps(entry) + "\n" for entry in kept))
            out.flush()
            os.fsync(out.fileno())
        self._file.close()
        os.replace(fresh, self.path)
        self._starts = kept
        self._seen = {str(entry.get("run_id")) for entry in kept}
        self._file = self.path.open("a", encoding="utf-8")
        # What is kept may itself be large (a busy machine): compact again only once the file
        # has doubled, so that compaction costs O(1) per entry written.
        self._compact_at = max(self.max_bytes, 2 * self.path.stat().st_size)

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
        if self._file.tell() > self._compact_at:
            self.compact()

    def _write(self, event: str, entries: list[tuple[str, int, dict[str, Any]]]) -> bool:
        if not entries:
            return False
        now = time.time()
        lines = []
        for run_id, fence, extra in entries:
            entry = {"at": now, "event": event, "run_id": run_id, "fence": fence, **extra}
            if event == "started":
                self._seen.add(run_id)
                self._starts.append(entry)
            lines.append(json.dumps(entry))
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()
        return True

    def close(self) -> None:
        self._file.close()
