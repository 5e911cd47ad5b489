"""The ``minimal`` and ``stack`` sections of ``python -m bench``: the independent limits.

Both run ``bench/minimal`` (which imports nothing of the product) in a namespace of their
own, ``<bench namespace>-min``, deleted at the end like the rest. Every drain is a window
guarded against noise (``bench.stats.guarded``): when other processes used more than 0.3
cores during it, it is drained again, at most twice, and the repeats are counted.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

from bench.minimal.runner import MinimalConfig, Rig, StackConfig
from bench.stats import Guarded, guarded, paired_ratio, rate_interval

MAX_REPEATS = 2


class Limits:
    def __init__(self, namespace: str, log: Callable[[str], None]) -> None:
        self.rig = Rig(ns=f"{namespace}-min", log=log)
        self.minimal: list[Guarded[dict[str, Any]]] = []
        self.stack: list[Guarded[dict[str, Any]]] = []
        self.max_repeats = MAX_REPEATS

    async def open(self) -> None:
        await self.rig.open()

    async def close(self, keep_logs: bool = False) -> dict[str, int]:
        return await self.rig.close(keep_logs)

    async def minimal_drain(self, runs: int, guard: bool = True) -> dict[str, Any]:
        """One minimal drain. ``guard=False`` for the drain paired with one of ours: that one
        is not repeated (ours is not), so both sides of the pair see the same machine."""
        label = f"min{len(self.minimal)}"
        window = await guarded(
            lambda: self.rig.drain_minimal(MinimalConfig(), runs, label),
            lambda r: float(r["others_cores"]),
            max_repeats=self.max_repeats if guard else 0,
        )
        self.minimal.append(window)
        return window.result

    async def stack_drain(self, messages: int) -> dict[str, Any]:
        label = f"stack{len(self.stack)}"
        window = await guarded(
            lambda: self.rig.drain_stack(StackConfig(), messages, label),
            lambda r: float(r["others_cores"]),
            max_repeats=self.max_repeats,
        )
        self.stack.append(window)
        return window.result

    async def complete(
        self, want: set[str], args: argparse.Namespace, sections: dict[str, Any]
    ) -> None:
        """The drains still missing (``args.pairs`` of each kind), then the sections; with
        our throughput drains, ``ratio_vs_minimal`` from the pairs (ours i, minimal i)."""
        while "minimal" in want and len(self.minimal) < args.pairs:
            await self.minimal_drain(args.minimal_runs)
        while "stack" in want and len(self.stack) < args.pairs:
            await self.stack_drain(args.stack_messages)
        for kind in ("minimal", "stack"):
            if (found := self.section(kind)) is not None:
                sections[kind] = found
        if "minimal" in sections and "throughput" in sections:
            sections["minimal"]["ratio_vs_minimal"] = ratio_vs_minimal(
                sections["throughput"]["drains"], sections["minimal"]
            )

    def section(self, kind: str) -> dict[str, Any] | None:
        windows = self.minimal if kind == "minimal" else self.stack
        if not windows:
            return None
        drains = [w.result for w in windows]
        cpu_keys = sorted(k for k in drains[0] if k.endswith("_us_per_msg"))
        out: dict[str, Any] = {
            "drains": drains,
            "rate": rate_interval([d["rate"] for d in drains]).as_dict(),
            "cpu_us_per_msg": {
                k.removesuffix("_us_per_msg"): statistics.median(d[k] for d in drains)
                for k in cpu_keys
            },
            "noise": {
                "limit_cores": 0.3,
                "windows": len(windows),
                "repeats": sum(w.repeats for w in windows),
                "still_noisy": sum(1 for w in windows if not w.quiet),
                "repeated_others_cores": [o for w in windows for o in w.discarded_others],
            },
        }
        if kind == "minimal":
            out["latency_p50_ms"] = statistics.median(d["latency_p50_ms"] for d in drains)
            out["latency_p99_ms"] = statistics.median(d["latency_p99_ms"] for d in drains)
            out["cpu_us_per_run"] = statistics.median(d["cpu_us_per_run"] for d in drains)
        return out


def ratio_vs_minimal(ours: list[dict[str, Any]], minimal: dict[str, Any]) -> dict[str, Any]:
    """Paired ratio of our drains to the minimal drains run right after each of them."""
    pairs = min(len(ours), len(minimal["drains"]))
    got = paired_ratio(
        [d["rate"] for d in ours[:pairs]], [d["rate"] for d in minimal["drains"][:pairs]]
    )
    return got.as_dict()


# ---- the table rows ----------------------------------------------------------------------------
def _interval(rate: dict[str, Any]) -> str:
    if rate.get("low") is None:
        return f"one drain (n={rate['n']})"
    return f"95 % {rate['low']:,.0f}-{rate['high']:,.0f} (n={rate['n']})"


def limit_rows(s: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The independent limits: the minimal hand-off and the raw one-hop loop."""
    out: list[tuple[str, str, str, str, str]] = []
    mini = s.get("minimal")
    if mini:
        ratio = mini.get("ratio_vs_minimal")
        note = ""
        if ratio:
            low, high = ratio["low"], ratio["high"]
            span = f" [{low:.2f}-{high:.2f}]" if low is not None else ""
            note = f"ratio_vs_minimal {ratio['estimate']:.2f}{span} ({ratio['n']} pairs)"
        out.append(
            (
                "minimal",
                "runs/s (drain, geometric mean)",
                f"{mini['rate']['estimate']:,.1f}",
                "",
                note,
            )
        )
        out.append(("", "  interval", _interval(mini["rate"]), "", ""))
        cpu = mini["cpu_us_per_msg"]
        out.append(
            (
                "",
                "  CPU µs/run dispatcher / workers / RabbitMQ",
                f"{cpu['dispatcher']:,.0f} / {cpu['worker']:,.0f} / {cpu['rabbit']:,.0f}",
                "",
                f"Redis {cpu['redis']:,.0f}",
            )
        )
        out.append(
            (
                "",
                "  consumed -> finished p50 / p99 ms",
                f"{mini['latency_p50_ms']:.1f} / {mini['latency_p99_ms']:.1f}",
                "",
                "in the drain (backlog)",
            )
        )
        out.append(_noise_row(mini))
    stack = s.get("stack")
    if stack:
        out.append(
            ("stack", "msgs/s one hop (drain, geometric mean)", f'{stack["rate"]["estimate"]:,.1f}',
             "", _interval(stack["rate"]))
        )  # fmt: skip
        cpu = stack["cpu_us_per_msg"]
        out.append(
            (
                "",
                "  CPU µs/msg loop / RabbitMQ / Redis",
                f"{cpu['loop']:,.0f} / {cpu['rabbit']:,.0f} / {cpu['redis']:,.0f}",
                "",
                "",
            )
        )
        out.append(_noise_row(stack))
    return out


def _noise_row(section: dict[str, Any]) -> tuple[str, str, str, str, str]:
    noise = section["noise"]
    others = [d["others_cores"] for d in section["drains"]]
    return (
        "",
        "  other tenants' cores (min-max)",
        f"{min(others):.2f}-{max(others):.2f}",
        "",
        f"{noise['repeats']} window(s) repeated (> 0.3 cores), {noise['still_noisy']} still noisy",
    )
