"""``python -m bench.minimal``: drains of the minimal hand-off and of the raw loop.

    python -m bench.minimal drain [--runs 3000 --reps 3 ...]   the minimal fenced hand-off
    python -m bench.minimal stack [--messages 10000 --reps 3]  the raw one-hop loop

Each run uses its own namespace and deletes it afterwards; results go to stdout as JSON
(``--output FILE`` too), progress to stderr. The process roles (``dispatcher``, ``worker``,
``stack-loop``) are started by the drains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.minimal import amqp, attempts, handoff, stack
from bench.minimal.runner import MinimalConfig, Rig, StackConfig
from bench.procfs import machine_times
from bench.stats import rate_interval


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.minimal",
        description="The independent minimal baseline (a fenced hand-off with the least work "
        "this stack allows) and the raw one-hop loop, on the real RabbitMQ and Redis.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m, c = MinimalConfig(), StackConfig()

    d = sub.add_parser("drain", help="drains of the minimal hand-off")
    d.add_argument("--runs", type=int, default=3000, help="runs per drain")
    d.add_argument("--reps", type=int, default=3, help="drains")
    d.add_argument("--machines", type=int, default=m.machines, help="machine queues")
    d.add_argument(
        "--worker-procs", type=int, default=m.worker_procs, help="worker processes (machines split)"
    )
    d.add_argument("--queues", choices=("quorum", "classic"), default=m.queues, help="queue type")
    d.add_argument("--d-batch", type=int, default=m.d_batch, help="dispatcher: largest batch")
    d.add_argument("--d-prefetch", type=int, default=m.d_prefetch, help="dispatcher: prefetch")
    d.add_argument("--d-depth", type=int, default=m.d_depth, help="dispatcher: batches at once")
    d.add_argument(
        "--d-consumers", type=int, default=m.d_consumers, help="dispatcher: request consumers"
    )
    d.add_argument(
        "--d-connections", type=int, default=m.d_connections, help="dispatcher: connections"
    )
    d.add_argument("--w-batch", type=int, default=m.w_batch, help="worker: largest batch")
    d.add_argument("--w-prefetch", type=int, default=m.w_prefetch, help="worker: prefetch")
    d.add_argument("--w-depth", type=int, default=m.w_depth, help="worker: batches at once")
    d.add_argument(
        "--publish",
        choices=amqp.PUBLISH_MODES,
        default=m.publish,
        help="a confirm window as one frame write, or basic_publish per message",
    )
    d.add_argument("--output", type=Path, help="also write the JSON here")

    s = sub.add_parser("stack", help="drains of the raw loop")
    s.add_argument("--messages", type=int, default=10_000, help="messages per drain")
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--queues", choices=("quorum", "classic"), default=c.queues, help="queue type")
    s.add_argument("--batch", type=int, default=c.batch, help="largest batch")
    s.add_argument("--prefetch", type=int, default=c.prefetch, help="prefetch")
    s.add_argument("--depth", type=int, default=c.depth, help="batches at once")
    s.add_argument("--no-redis", action="store_true", help="leave the pipeline out")
    s.add_argument(
        "--publish",
        choices=amqp.PUBLISH_MODES,
        default=c.publish,
        help="basic_publish per message, or a confirm window as one frame write",
    )
    s.add_argument("--client", choices=("aiormq", "aio-pika"), default=c.client, help="AMQP client")
    s.add_argument("--output", type=Path, help="also write the JSON here")

    a = sub.add_parser("attempts", help="the tuning attempts, paired with the defaults")
    a.add_argument("--only", choices=("minimal", "stack"), help="one family of attempts")
    a.add_argument("--pairs", type=int, default=2, help="interleaved pairs per attempt")
    a.add_argument("--runs", type=int, default=3000, help="runs per minimal drain")
    a.add_argument("--messages", type=int, default=10_000, help="messages per stack drain")
    a.add_argument("--output", type=Path)

    r = sub.add_parser("dispatcher", help="(started by drain) the minimal dispatcher")
    handoff.add_arguments(r, batch=m.d_batch, prefetch=m.d_prefetch)
    r.add_argument("--machines", type=int, required=True, help="machines 0..N-1")
    r.add_argument("--consumers", type=int, default=1, help="request consumers")
    w = sub.add_parser("worker", help="(started by drain) minimal workers")
    handoff.add_arguments(w, batch=m.w_batch, prefetch=m.w_prefetch)
    w.add_argument("--machines", required=True, help="comma-separated machine numbers")
    sl = sub.add_parser("stack-loop", help="(started by stack) the raw loop")
    handoff.add_arguments(sl, batch=c.batch, prefetch=c.prefetch)
    sl.set_defaults(depth=c.depth, publish=c.publish)
    sl.add_argument("--no-redis", action="store_true")
    sl.add_argument("--client", choices=("aiormq", "aio-pika"), default=c.client)
    return parser.parse_args(argv)


def summary(drains: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [d["rate"] for d in drains]
    return {
        "rate": rate_interval(rates).as_dict(),
        "rates": rates,
        "others_cores": [d["others_cores"] for d in drains],
    }


async def run_attempts(args: argparse.Namespace) -> dict[str, Any]:
    rig = Rig(log=log)
    log(f"namespace {rig.names.ns}; logs in {rig.workdir}")
    out: dict[str, Any] = {}
    failed = True
    try:
        await rig.open()
        if args.only in (None, "stack"):
            out["stack"] = await attempts.compare(
                rig,
                attempts.STACK,
                attempts.S,
                lambda cfg, label: rig.drain_stack(cfg, args.messages, label),
                args.pairs,
            )
            print(attempts.table(out["stack"], "msgs/s", ["loop", "rabbit"]), flush=True)
        if args.only in (None, "minimal"):
            out["minimal"] = await attempts.compare(
                rig,
                attempts.MINIMAL,
                attempts.M,
                lambda cfg, label: rig.drain_minimal(cfg, args.runs, label),
                args.pairs,
            )
            cpu = ["dispatcher", "worker", "rabbit"]
            print(attempts.table(out["minimal"], "runs/s", cpu), flush=True)
        failed = False
    finally:
        out["cleanup"] = await rig.close(keep_logs=failed)
        log(f"cleaned up: {out['cleanup']}")
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rig = Rig(log=log)
    log(f"namespace {rig.names.ns}; logs in {rig.workdir}")
    drains: list[dict[str, Any]] = []
    busy0 = machine_times()
    failed = True
    try:
        await rig.open()
        for rep in range(args.reps):
            if args.command == "drain":
                cfg = MinimalConfig(
                    machines=args.machines,
                    worker_procs=args.worker_procs,
                    queues=args.queues,
                    d_batch=args.d_batch,
                    d_prefetch=args.d_prefetch,
                    d_depth=args.d_depth,
                    d_consumers=args.d_consumers,
                    d_connections=args.d_connections,
                    w_batch=args.w_batch,
                    w_prefetch=args.w_prefetch,
                    w_depth=args.w_depth,
                    publish=args.publish,
                )
                drains.append(await rig.drain_minimal(cfg, args.runs, f"rep{rep}"))
            else:
                scfg = StackConfig(
                    queues=args.queues,
                    batch=args.batch,
                    prefetch=args.prefetch,
                    depth=args.depth,
                    redis=not args.no_redis,
                    client=args.client,
                    publish=args.publish,
                )
                drains.append(await rig.drain_stack(scfg, args.messages, f"rep{rep}"))
        failed = False
    finally:
        cleanup = await rig.close(keep_logs=failed)
        log(f"cleaned up: {cleanup}")
    busy1 = machine_times()
    out = {"command": args.command, "drains": drains, "cleanup": cleanup, **summary(drains)}
    out["machine_busy_cores_overall"] = round(
        (busy1[0] - busy0[0]) / max(1e-9, busy1[2] - busy0[2]) * (os.cpu_count() or 1), 2
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.command in ("dispatcher", "worker"):
        args.role = args.command
        return asyncio.run(handoff.serve(args))
    if args.command == "stack-loop":
        return asyncio.run(stack.serve(args))
    if args.command == "attempts":
        found = asyncio.run(run_attempts(args))
        if args.output:
            args.output.write_text(json.dumps(found, indent=2) + "\n")
        return 0
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
