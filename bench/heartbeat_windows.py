"""Heartbeat-only windows at one fleet size, one after the other, with nothing restarted in
between: the steady cost of a live fleet's heartbeats, window by window.

The ``livefleet`` section starts a new simulator for every phase, so each of its windows
follows a settle (machines coming back online); here one simulator keeps ``--machines``
machines heartbeating and ``--windows`` windows of ``--window-s`` seconds are measured in a
row. ``--profile DIR`` also records ``py-spy`` (GIL samples) of the dispatcher during each
window but the first (``DIR/window-N.txt``; ``bench.profile.summarize_profile`` reads them;
py-spy pauses the process to sample, so those windows cost a little more).

``python -m bench.heartbeat_windows --machines 10000 --windows 6`` prints one JSON line per
window: heartbeats a second, dispatcher cores and CPU µs per heartbeat, other processes' cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.livefleet import LiveFleet
from bench.procfs import cores, machine_load, sample
from bench.runner import Bench


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def windows(machines: int, count: int, window_s: float, profile: Path | None) -> None:
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
            first, stats0 = sample(pids), fleet.stats()
            await asyncio.sleep(window_s)
            last, stats1 = sample(pids), fleet.stats()
            if spy is not None:
                await spy.wait()
            beats = (stats1["heartbeats"] - stats0["heartbeats"]) / (stats1["at"] - stats0["at"])
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
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    asyncio.run(windows(args.machines, args.windows + 1, args.window_s, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
