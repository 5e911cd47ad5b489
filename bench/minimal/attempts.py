"""The tuning attempts of bench/README.md ("Minimal baseline: what was tried"), reproducible:

    python -m bench.minimal attempts [--only minimal|stack] [--pairs 2] [--runs 3000]

Every attempt is drained in interleaved pairs with the default configuration (default,
attempt, default, attempt, ...), so each row's ratio compares drains that saw about the same
machine; a drain during which other processes used more than 0.3 cores is drained again (at
most twice, counted in the table). Prints a Markdown table per family and writes the JSON
with ``--output``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from typing import Any

from bench.minimal.runner import MinimalConfig, Rig, StackConfig
from bench.stats import guarded, paired_ratio

MAX_REPEATS = 2  # a window with others above 0.3 cores is drained again, at most twice

M = MinimalConfig()
S = StackConfig()

MINIMAL: dict[str, MinimalConfig] = {
    "no overlap (dispatcher and workers depth 1)": dataclasses.replace(M, d_depth=1, w_depth=1),
    "dispatcher depth 4": dataclasses.replace(M, d_depth=4, d_prefetch=800),
    "dispatcher batch 50, prefetch 200": dataclasses.replace(M, d_batch=50, d_prefetch=200),
    "dispatcher batch 200, prefetch 800": dataclasses.replace(M, d_batch=200, d_prefetch=800),
    "2 request consumers, 2 connections": dataclasses.replace(M, d_consumers=2, d_connections=2),
    "worker batch 20, prefetch 40": dataclasses.replace(M, w_batch=20, w_prefetch=40),
    "worker depth 1": dataclasses.replace(M, w_depth=1),
    "2 worker processes (4 machines each)": dataclasses.replace(M, worker_procs=2),
    "1 worker process (8 machines)": dataclasses.replace(M, worker_procs=1),
    "classic queues": dataclasses.replace(M, queues="classic"),
    "basic_publish per message (aiormq's API)": dataclasses.replace(M, publish="aiormq"),
}

STACK: dict[str, StackConfig] = {
    "batch 50, prefetch 100": dataclasses.replace(S, batch=50, prefetch=100),
    "batch 200, prefetch 400": dataclasses.replace(S, batch=200, prefetch=400),
    "depth 2 (overlapping batches), prefetch 400": dataclasses.replace(S, depth=2, prefetch=400),
    "classic queues": dataclasses.replace(S, queues="classic"),
    "no Redis (AMQP only)": dataclasses.replace(S, redis=False),
    "a window as one frame write": dataclasses.replace(S, publish="frames"),
    "aio-pika instead of aiormq (the reference's client)": dataclasses.replace(
        S, client="aio-pika"
    ),
}


async def compare(
    rig: Rig,
    attempts: dict[str, Any],
    default: Any,
    drain: Callable[[Any, str], Any],
    pairs: int,
) -> list[dict[str, Any]]:
    rows = []
    for name, cfg in attempts.items():
        rig.log(f"attempt: {name}")
        base, tried = [], []
        repeats = 0
        for i in range(pairs):
            for side, config, into in (("default", default, base), ("attempt", cfg, tried)):
                window = await guarded(
                    lambda c=config, label=f"{side}{i}": drain(c, label),
                    lambda r: float(r["others_cores"]),
                    max_repeats=MAX_REPEATS,
                )
                repeats += window.repeats
                into.append(window.result)
        ratio = paired_ratio([t["rate"] for t in tried], [b["rate"] for b in base], min_pairs=1)
        rows.append(
            {"attempt": name, "default": base, "tried": tried, "repeats": repeats} | ratio.as_dict()
        )
    return rows


def table(rows: list[dict[str, Any]], unit: str, cpu: list[str]) -> str:
    head = f"| attempt | {unit} default | {unit} attempt | ratio (pairs) |"
    head += "".join(f" {c} µs/msg default → attempt |" for c in cpu)
    head += " others cores | windows repeated |"
    lines = [head, "|" + "---|" * (6 + len(cpu))]
    for row in rows:

        def med(side: str, key: str, row: dict[str, Any] = row) -> float:
            return float(statistics.median(d[key] for d in row[side]))

        cells = [
            row["attempt"],
            f"{med('default', 'rate'):,.0f}",
            f"{med('tried', 'rate'):,.0f}",
            f"{row['estimate']:.2f} ({', '.join(f'{r:.2f}' for r in row['ratios'])})",
        ]
        for c in cpu:
            cells.append(
                f"{med('default', c + '_us_per_msg'):,.0f} → {med('tried', c + '_us_per_msg'):,.0f}"
            )
        others = [d["others_cores"] for side in ("default", "tried") for d in row[side]]
        cells.append(f"{min(others):.2f}-{max(others):.2f}")
        cells.append(str(row["repeats"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
