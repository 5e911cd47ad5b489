"""Heartbeat-only windows at one fleet size, one after the other, with nothing restarted in
between: the steady cost of a live fleet's heartbeats, window by window.

The ``livefleet`` section starts a new simulator for every phase, so each of its windows
follows a settle (machines coming back online); here one simulator keeps ``--machines``
machines heartbeating and ``--windows`` windows of ``--window-s`` seconds are measured in a
row. ``--profile DIR`` also records ``py-spy`` (GIL samples) of the dispatcher during each
window but the first (``DIR/window-N.txt``; ``bench.profile.summarize_profile`` reads them;
py-spy pauses the process to sample, so those windows cost a little more). ``--gc-stats``
also reports the dispatcher's garbage collections in each window (count and CPU seconds per
generation, through ``bench/gc_hook/sitecustomize.py``).

``python -m bench.heartbeat_windows --machines 10000 --windows 6`` prints one JSON line per
window: heartbeats a second, dispatcher cores and CPU µs per heartbeat, other processes' cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.livefleet import LiveFleet
from bench.procfs import cores, machine_load
from bench.runner import Bench


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


GC_HOOK = Path(__file__).resolve().parent / "gc_hook"


def gc_stats(path: Path | None) -> dict[str, list[float]]:
    """The dispatcher's collections so far per generation: [count, CPU seconds]."""
    if path is None or not path.exists():
        return {}
    generations: dict[str, list[float]] = json.loads(path.read_text())["generations"]
    return generations


async def windows(
    machines: int, count: int, window_s: float, profile: Path | None, gc_file: Path | None
) -> None:
    if gc_file is not None:  # the dispatcher inherits the environment (bench.env.settings_env)
        os.environ["BENCH_GC_STATS"] = str(gc_file)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(GC_HOOK), os.environ.get("PYTHONPATH")) if p
        )
    bench = Bench(live=8, fleet_small=10, log=log)
    await bench.setup()
    fleet = LiveFleet(bench, log, size=machines, queue_type="classic")
    try:
        await fleet.open()
        await fleet.phase(machines, drain_runs=0, window_s=window_s)  # settles, then window 0
        assert fleet.dispatcher is not None
        dpid = bench.pids_of([fleet.dispatcher])[0]
        pids = [dpid, *(p for p in (bench.rabbit_pid, bench.redis_pid) if p)]
        for index in range(1, count):
            spy = None
            if profile is not None:
                spy = await asyncio.create_subprocess_exec(
                    shutil.which("py-spy") or f"{Path(sys.executable).parent}/py-spy", "record",
                    "--pid", str(dpid), "--duration", str(int(window_s)), "--rate", "250",
                    "--gil", "--format", "raw", "-o", str(profile / f"window-{index}.txt"),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
            gc0 = gc_stats(gc_file)
            beats, first, last = await fleet.heartbeat_window(pids, window_s)
            gc1 = gc_stats(gc_file)
            if spy is not None:
                await spy.wait()
            dispatcher = cores(first, last, [dpid])
            busy, _ = machine_load(first, last)
            row: dict[str, Any] = {
                "window": index,
                "live_machines": machines,
                "heartbeats_per_s": round(beats, 1),
                "dispatcher_cores": round(dispatcher, 4),
                "heartbeat_cpu_us": round(dispatcher * 1e6 / beats, 1) if beats else None,
                "profiled": spy is not None,
                "others_cores": round(max(0.0, busy - cores(first, last, pids)), 2),
            }
            if gc1:
                row["gc"] = {
                    f"gen{g}": [int(n - gc0.get(g, [0, 0])[0]), round(s - gc0.get(g, [0, 0])[1], 3)]
                    for g, (n, s) in gc1.items()
                }
            print(json.dumps(row), flush=True)
    finally:
        await fleet.close()
        await bench.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.heartbeat_windows",
        description="Steady heartbeat-only windows of a live fleet (one simulator, no restarts).",
    )
    parser.add_argument("--machines", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=6, help="windows after the first (6)")
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--profile", type=Path, help="directory for py-spy's GIL samples")
    parser.add_argument(
        "--gc-stats",
        action="store_true",
        help="report the dispatcher's garbage collections per window ([count, CPU s] a generation)",
    )
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gc_file = Path(tmp) / "gc.json" if args.gc_stats else None
        asyncio.run(windows(args.machines, args.windows + 1, args.window_s, args.profile, gc_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
