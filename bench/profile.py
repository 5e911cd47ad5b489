"""A self / inclusive summary of py-spy's collapsed stacks (``--profile``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    if not path.exists():
        return {"error": f"{path} was not written (py-spy needs ptrace permission)"}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
        if frames and frames[0].startswith("thread"):
            frames = frames[1:]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"error": "no samples"}
    return {
        "samples": total,
        "self": [(f, round(c / total * 100, 1)) for f, c in own.most_common(top)],
        "inclusive": [(f, round(c / total * 100, 1)) for f, c in inclusive.most_common(top * 2)],
    }


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    parts = file.split("/")
    short = "/".join(parts[-2:]) if parts else file
    return f"{name} ({short})"
