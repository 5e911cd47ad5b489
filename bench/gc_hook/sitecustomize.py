"""Loaded by every Python process started with this directory on ``PYTHONPATH``
(``python -m bench.heartbeat_windows --gc-stats``): in a dispatcher replica
(``python -m dispatcher serve``), count the garbage collector's collections and their CPU time
per generation and write them to ``$BENCH_GC_STATS`` every second (a small JSON file, written
whole then renamed). Any other process is left alone."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any


def _is_replica() -> bool:
    try:
        argv = Path("/proc/self/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"dispatcher" in argv and b"serve" in argv


def _install(path: Path) -> None:
    stats: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    began = [0.0]

    def on_collection(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.process_time()
            return
        entry = stats[info["generation"]]
        entry[0] += 1
        entry[1] += time.process_time() - began[0]

    def write() -> None:
        while True:
            time.sleep(1.0)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"at": time.time(), "generations": stats}))
            tmp.replace(path)

    gc.callbacks.append(on_collection)
    threading.Thread(target=write, name="gc-stats", daemon=True).start()


if os.environ.get("BENCH_GC_STATS") and _is_replica():
    _install(Path(os.environ["BENCH_GC_STATS"]))
