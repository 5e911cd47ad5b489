"""``python -m dispatcher capacity``: replay a target's recorded runs on a changed fleet."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from dispatcher.core.capacity import Summary
from dispatcher.settings import Settings
from dispatcher.tools.commands import parse_time, print_json


def register(sub: Any) -> None:
    help_text = (
        "what-if: replay a target's recorded arrivals and durations with N more (or fewer) "
        "machines; p50/p95 queue wait and time-outs"
    )
    p = sub.add_parser("capacity", help=help_text, description=help_text)
    p.set_defaults(handler=cmd_capacity)
    p.add_argument("--target", required=True, help="g:<group_id> (or m:<machine_id>, N = 0)")
    p.add_argument("--add-machines", type=int, default=0, help="machines to add (negative: remove)")
    p.add_argument("--since", default="-24h", help="ISO time, epoch seconds, or -24h / -30m")
    p.add_argument("--json", action="store_true")


def _row(label: str, summary: Summary) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    return (
        f"{label:<10} machines {summary.machines:>3}  runs {summary.runs:>6}  "
        f"handed over {summary.dispatched:>6}  timed out {summary.timed_out:>5}  "
        f"p50 wait {seconds(summary.p50_wait_s):>9}  p95 wait {seconds(summary.p95_wait_s):>9}"
    )


async def cmd_capacity(args: argparse.Namespace, settings: Settings) -> int:
    from dispatcher.tools.client import Client

    async with Client.connect(settings) as client:
        report = await client.capacity(
            args.target, add_machines=args.add_machines, since=parse_time(args.since)
        )
    if args.json:
        print_json(dataclasses.asdict(report))
        return 0
    print(f"{report.target}: replay of the runs queued since {args.since}")
    print(f"(hand-over {report.handover_s:.2f} s per freed slot, as measured in the trace)")
    print(_row("recorded", report.recorded))
    print(_row("today", report.today))
    sign = "+" if report.added >= 0 else ""
    print(_row(f"{sign}{report.added} mach.", report.changed))
    return 0
