"""``python -m bench``: run the sections, print the table, write bench/results/latest.json, and
end with the one line of ratios. Progress goes to stderr; the table and the line to stdout."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.env import leftovers, require_rabbitmq_files
from bench.limits import Limits
from bench.report import final_line, hops, print_table
from bench.runner import Bench, median_of
from bench.stats import LatencyPool, paired_ratio, rate_interval
from bench.tokens import measure_tokens
from dispatcher.adapters.amqp.node_files import files_per_machine
from dispatcher.settings import Settings

SECTIONS = (
    "baseline",
    "throughput",
    "latency",
    "replicas",
    "fleet",
    "queue",
    "memory",
    "hops",
    "tokens",
    "minimal",
    "stack",
    "predict",
    "saturation",
    "deepqueue",
    "livefleet",
)
RESULTS = Path(__file__).resolve().parent / "results"
# Each paced window of ``--paced-replicas`` (seconds of load, the first 2 s included).
PACED_REPLICAS_S = 20.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the dispatcher against the physical limit of its design, on the "
        "real RabbitMQ and Redis, in a private namespace that is deleted afterwards.",
    )
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (~3 min)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections to run: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--profile", action="store_true", help="also profile the dispatcher")
    parser.add_argument("--live", type=int, default=8, help="machines with a simulated worker")
    parser.add_argument("--runs", type=int, default=None, help="runs per drain")
    parser.add_argument("--reps", type=int, default=None, help="drains per throughput figure")
    parser.add_argument("--queued", type=int, default=100_000, help="waiting runs (scale)")
    parser.add_argument("--fleet", type=int, default=1000, help="machines (scale)")
    parser.add_argument(
        "--live-fleet",
        type=int,
        default=10_000,
        help="live machines of the livefleet section (one simulator process speaks for them)",
    )
    parser.add_argument(
        "--machine-queues",
        choices=("classic", "quorum"),
        default="classic",
        help="machine queue type of the livefleet section (bench/README.md explains why classic)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="drains of the minimal baseline and of the raw loop (default 5, quick 2); the "
        "first --reps of them interleave with the throughput drains",
    )
    parser.add_argument(
        "--minimal-runs", type=int, default=None, help="runs per minimal drain (10,000)"
    )
    parser.add_argument(
        "--stack-messages", type=int, default=None, help="messages per raw-loop drain (20,000)"
    )
    parser.add_argument(
        "--max-repeats",
        type=int,
        default=2,
        help="times a window with other processes above 0.3 cores is measured again (2)",
    )
    parser.add_argument(
        "--deep", type=int, default=1_000_000, help="runs queued in the drained target (deepqueue)"
    )
    parser.add_argument(
        "--paced-replicas",
        action="store_true",
        help="replicas: also pairs under a paced load at 50 %% of the reference drain's rate "
        "(dispatcher CPU per run where the machine is not saturated; ~3 min more)",
    )
    parser.add_argument(
        "--replicas-modes",
        default="all,one",
        help="replicas: the RUNDISPATCH_ACTIVE_REPLICAS modes whose pairs are measured, "
        "comma-separated (all,one): 'all' gives replica_cpu_ratio, 'one' "
        "replica_cpu_ratio_one_active (~3 min each)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in (*SECTIONS, "profile")]
    if unknown:
        parser.error(f"unknown section(s): {', '.join(unknown)}")
    modes = {m.strip() for m in args.replicas_modes.split(",") if m.strip()}
    if not modes or modes - {"all", "one"}:
        parser.error(f"--replicas-modes: 'all', 'one' or both, not {args.replicas_modes!r}")
    args.replicas_modes = modes
    args.sections = chosen or list(SECTIONS)
    if args.profile and "profile" not in args.sections:
        args.sections.append("profile")
    args.runs = args.runs or (1500 if args.quick else 3000)
    # 5 interleaved pairs per ratio (the statistics' minimum), 2 in the quick form.
    args.reps = args.reps or (2 if args.quick else 5)
    args.pairs = args.pairs or (2 if args.quick else 5)
    # ~4-5x the product's rate: as many more runs keep the measured window as long.
    args.minimal_runs = args.minimal_runs or (5_000 if args.quick else 10_000)
    args.stack_messages = args.stack_messages or (10_000 if args.quick else 20_000)
    # 5 windows of 12 s measured (after a 2 s warm-up) pool 60 s of samples per side.
    args.latency_s = 10.0 if args.quick else 14.0
    args.latency_reps = 2 if args.quick else 5
    return args


def file_plans(
    args: argparse.Namespace, want: set[str], settings: Settings
) -> dict[str, tuple[int, int]]:
    """RabbitMQ files the sections with thousands of machines need: at least (a quorum
    queue's from its declaration) and at most (a classic queue's once it stored a message);
    see ``require_rabbitmq_files``."""
    plans = {}
    for section, machines, queue_type in (
        ("fleet", args.fleet, settings.machine_queue_type),
        ("livefleet", args.live_fleet, args.machine_queues),
    ):
        if section in want:
            at_most = machines * files_per_machine(queue_type)
            plans[section] = (at_most if queue_type == "quorum" else 0, at_most)
    return plans


def _quiet_shutdown(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """aiormq's channel readers complain when an interrupted run is torn down: drop that."""
    if str(context.get("message", "")).startswith("unhandled exception during asyncio.run()"):
        return
    loop.default_exception_handler(context)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    asyncio.get_running_loop().set_exception_handler(_quiet_shutdown)
    sections: dict[str, Any] = {}
    bench = Bench(live=args.live, fleet_small=10, log=log)
    started = time.time()
    code = code_info()  # at the start: others commit to the same tree while the bench runs
    log(f"namespace {bench.settings.namespace}; work dir {bench.workdir}")
    want = set(args.sections)
    reference: list[dict[str, Any]] = []
    scenarios.MAX_REPEATS = args.max_repeats
    need_limits = want & {"minimal", "stack", "saturation"}
    limits = Limits(bench.settings.namespace, log) if need_limits else None
    failed = True
    try:
        await require_rabbitmq_files(bench.settings, file_plans(args, want, bench.settings))
        await bench.setup()
        if limits is not None:
            limits.max_repeats = args.max_repeats
            await limits.open()

        if want & {"baseline", "throughput"}:
            log("throughput: drains of a pre-filled requests queue")
            ours, base = [], []
            for _ in range(args.reps):
                if "throughput" in want:
                    ours.append(await bench.drain("ours", args.runs, label="ours"))
                if "baseline" in want:
                    base.append(await bench.drain("baseline", args.runs, label="baseline"))
                if limits is not None and "minimal" in want:
                    await limits.minimal_drain(args.minimal_runs, guard=False)  # paired
            if ours:
                sections["throughput"] = {"drains": ours, "rate": median_of(ours, "rate")}
                reference = ours
            if base:
                sections["baseline"] = {"drains": base, "rate": median_of(base, "rate")}

        if limits is not None:
            log("limits: the minimal hand-off and the raw one-hop loop (bench/minimal)")
            await limits.complete(want, args, sections)

        needs_reference = want & {"latency", "replicas", "fleet", "queue", "profile"}
        if needs_reference and not reference:
            log("reference drain (10 queued, 10 machines, 1 dispatcher)")
            reference = [await bench.drain("ours", args.runs, label="reference")]
            sections["reference"] = {"drains": reference, "rate": median_of(reference, "rate")}
        ref_rate = median_of(reference, "rate") if reference else None
        ref_cost = median_of(reference, "dispatcher_us_per_run") if reference else None

        if "latency" in want and ref_rate:
            rate = 0.5 * ref_rate
            log(f"latency: paced producer at {rate:.0f} runs/s (50 % of {ref_rate:.0f})")
            reps: dict[str, list[dict[str, Any]]] = {"ours": [], "baseline": []}
            for _ in range(args.latency_reps):
                for kind in ("ours", "baseline"):
                    reps[kind].append(await bench.paced(kind, rate, args.latency_s))
            pooled = {kind: pool_latency(reps[kind]) for kind in reps}
            sections["latency"] = {
                "rate": rate,
                "ours": median_merge(reps["ours"]),
                "baseline": median_merge(reps["baseline"]),
                "pooled": pooled,
                "ratio_p99_pairs": paired_ratio(
                    [r["started_p99_ms"] for r in reps["ours"]],
                    [r["started_p99_ms"] for r in reps["baseline"]],
                ).as_dict(),
                "reps": reps,
            }

        modes = args.replicas_modes  # the set parse() made of the option
        if "replicas" in want and ref_rate and "all" in modes:
            log(f"replicas: {args.reps} pairs of drains with two and with one dispatcher")
            sections["replicas"] = replica_pairs(
                await scenarios.replicas(bench, args.reps, args.runs)
            )
        if "replicas" in want and ref_rate and "one" in modes:
            log(f"replicas, active_replicas=one: {args.reps} pairs of drains, two and one")
            async with bench.active_replicas("one"):
                one_active = replica_pairs(await scenarios.replicas(bench, args.reps, args.runs))
            sections.setdefault("replicas", {})["one_active"] = one_active
        if "replicas" in want and ref_rate and args.paced_replicas:
            rate = 0.5 * ref_rate
            log(f"replicas: {args.reps} pairs paced at {rate:.0f} runs/s, two and one")
            sections.setdefault("replicas", {})["paced"] = await scenarios.replicas_paced(
                bench, args.reps, rate, PACED_REPLICAS_S
            )

        if "saturation" in want and limits is not None:
            log(f"saturation: {args.reps} pairs of (dispatcher with a simulated fleet, raw loop)")
            sections["saturation"] = await scenarios.saturation(
                bench, limits, args.reps, args.runs, args.stack_messages
            )

        if "deepqueue" in want:
            log(f"deep queue: {args.deep:,} runs queued in the drained target, {args.reps} pairs")
            sections["deepqueue"] = await scenarios.deep_queue(
                bench, args.deep, args.reps, args.runs
            )

        if "profile" in want:
            log("profile: py-spy on the dispatcher during a drain")
            drained = await bench.drain("ours", args.runs, label="profile", profile=True)
            from bench.profile import summarize_profile

            sections["profile"] = {
                "drain": drained,
                "dispatcher": summarize_profile(RESULTS / "profile-dispatcher-profile.txt"),
                "worker": summarize_profile(RESULTS / "profile-worker-profile.txt"),
            }

        if "fleet" in want and ref_cost:
            log(f"fleet scale: {args.fleet} machines registered")
            big = await bench.fleet_scale(args.fleet, args.runs, profile="profile" in want)
            sections["fleet"] = {
                "machines_small": bench.fleet_small,
                "machines_large": args.fleet,
                "cost_small_us": ref_cost,
                "cost_large_us": big["dispatcher_us_per_run"],
                "ratio": round(big["dispatcher_us_per_run"] / ref_cost, 2),
                "rate_small": ref_rate,
                "rate_large": big["rate"],
                "drain": big,
            }

        if "livefleet" in want:
            from bench.livefleet import live_fleet_section

            log(f"live fleet: {args.live_fleet} machines heartbeating through one simulator")
            sections["livefleet"] = await live_fleet_section(
                bench,
                log,
                size=args.live_fleet,
                runs=args.runs,
                pairs=args.pairs,
                window_s=6.0 if args.quick else 10.0,
                queue_type=args.machine_queues,
            )

        if "predict" in want:
            from bench.predict import predict_section

            sections["predict"] = await predict_section(bench, args.runs, max(1, args.reps), log)

        if want & {"queue", "memory"}:
            log(f"queue scale and memory: {args.queued} waiting runs")
            memory: dict[str, Any] = {}
            if "memory" in want:
                memory["rss_10"] = await bench.idle_rss()
            memory["usage"] = await bench.fill_queue(args.queued)
            if "memory" in want:
                memory["rss_large"] = await bench.idle_rss()
                log(
                    f"  dispatcher RSS idle: {memory['rss_10']['rss_mb']} MB with 10 queued, "
                    f"{memory['rss_large']['rss_mb']} MB with {args.queued}"
                )
                sections["memory"] = memory
            if "queue" in want and ref_cost:
                large = await bench.drain(
                    "ours", args.runs, label=f"queue-{args.queued}", profile="profile" in want
                )
                sections["queue"] = {
                    "queued_small": 10,
                    "queued_large": args.queued,
                    "cost_small_us": ref_cost,
                    "cost_large_us": large["dispatcher_us_per_run"],
                    "ratio": round(large["dispatcher_us_per_run"] / ref_cost, 2),
                    "rate_small": ref_rate,
                    "rate_large": large["rate"],
                    "drain": large,
                    "memory": memory["usage"],
                }

        if "hops" in want:
            log("hops: Redis round trips and AMQP frames per run, counted in the processes")
            bench.tracing = True
            bench.stop_workers("ours")
            bench.stop_workers("baseline")
            runs = min(args.runs, 2000)
            traced = {
                kind: await bench.drain(kind, runs, label=f"hops-{kind}")
                for kind in ("ours", "baseline")
            }
            bench.tracing = False
            sections["hops"] = {
                "runs": runs,
                "ours": traced["ours"]["per_run"],
                "baseline": traced["baseline"]["per_run"],
            }

        if "tokens" in want:
            log("tokens: cache hits and refreshes under 500 concurrent sign-in runs")
            sections["tokens"] = await measure_tokens(bench.settings, bench.workdir)
            log(f"  {sections['tokens']}")
        failed = False
    finally:
        log("cleaning up")
        minimal_cleanup = await limits.close(failed) if limits is not None else None
        removed = await bench.close()
        if failed:
            log(f"  process logs kept in {bench.workdir}")
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
        left = await leftovers(bench.settings)
        sections["cleanup"] = {**removed, "redis_keys_left": left}
        if minimal_cleanup is not None:
            sections["cleanup"]["minimal"] = minimal_cleanup
        log(
            f"  deleted {removed['redis_keys']} Redis keys, {removed['queues']} queues; left {left}"
        )
    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "quick": args.quick,
        "machine": machine_info(),
        "code": code,
        "config": {
            "live_machines": args.live,
            "runs_per_drain": args.runs,
            "reps": args.reps,
            "latency_s": args.latency_s,
            "queued": args.queued,
            "fleet": args.fleet,
            "deep": args.deep,
            "live_fleet": args.live_fleet,
            "pairs": args.pairs,
            "minimal_runs": args.minimal_runs,
            "stack_messages": args.stack_messages,
            "sections": args.sections,
            "settings": {
                k: v
                for k, v in bench.settings.model_dump(mode="json").items()
                if k not in {"secret_keys", "client_secret", "amqp_url", "redis_url"}
            },
        },
        "hops": hops(),
        "sections": sections,
    }


def median_merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result whose every number is the median over ``results`` (nested dicts too)."""
    merged: dict[str, Any] = {}
    for key, value in results[0].items():
        values = [r[key] for r in results if key in r]
        if isinstance(value, dict):
            merged[key] = median_merge(values) if values and all(values) else value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            merged[key] = statistics.median(values)
        else:
            merged[key] = value
    return merged


def pool_latency(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Submit -> started of every window pooled (a run that never started is a miss, +inf);
    the raw samples leave the windows' results here."""
    pool = LatencyPool()
    for window in windows:
        pool.add(window.pop("_started_ms"), window["missing_started"], window.pop("_measured_s"))
    summary = pool.summary()
    # +inf (more than 1 % misses) is written as null: JSON has no infinity.
    return {
        k: ((round(v, 1) if math.isfinite(v) else None) if isinstance(v, float) else v)
        for k, v in summary.items()
    }


def code_info() -> dict[str, Any]:
    """The commit measured, and product files changed since (others work in the same tree)."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv],
                cwd=RESULTS.parent.parent,
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:
            return ""
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "dispatcher", "workers").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted_product_files": dirty}


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            model = next((ln.split(":", 1)[1].strip() for ln in handle if "model name" in ln), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_avg": os.getloadavg(),
    }


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    s = report["sections"]
    out: dict[str, Any] = {}
    if "throughput" in s and "baseline" in s:
        out["ratio_throughput"] = round(s["throughput"]["rate"] / s["baseline"]["rate"], 2)
        pairs = min(len(s["throughput"]["drains"]), len(s["baseline"]["drains"]))
        s["throughput"]["ratio_throughput_pairs"] = paired_ratio(
            [d["rate"] for d in s["throughput"]["drains"][:pairs]],
            [d["rate"] for d in s["baseline"]["drains"][:pairs]],
        ).as_dict()
    if "latency" in s:
        ours, base = s["latency"]["ours"], s["latency"]["baseline"]
        out["ratio_p99"] = round(ours["started_p99_ms"] / base["started_p99_ms"], 2)
        out["ratio_p99_dispatched"] = round(
            ours["dispatched_p99_ms"] / base["dispatched_p99_ms"], 2
        )
        pooled = s["latency"].get("pooled")
        if pooled and pooled["ours"]["p99_ms"] and pooled["baseline"]["p99_ms"]:
            # The pooled p99 (>= 60 s of samples per side, misses counted) is the figure.
            out["ratio_p99"] = round(pooled["ours"]["p99_ms"] / pooled["baseline"]["p99_ms"], 2)
        if pooled:
            out["p99_ms_half_load"] = pooled["ours"]["p99_ms"] or math.inf
    if "queue" in s:
        out["ratio_queue_scale"] = s["queue"]["ratio"]
    if "fleet" in s:
        out["ratio_fleet_scale"] = s["fleet"]["ratio"]
    live = s.get("livefleet")
    if live and "ratio" in live:
        out["ratio_live_fleet_10k"] = live["ratio"]["estimate"]
    if live and "heartbeat_cpu_us" in live:
        out["heartbeat_cpu_us"] = live["heartbeat_cpu_us"]["estimate"]
    usage = (s.get("queue") or {}).get("memory") or (s.get("memory") or {}).get("usage")
    if usage:
        out["redis_bytes_per_queued_run"] = usage["bytes_per_queued_run"]
    if "minimal" in s:
        out["minimal_runs_per_s"] = s["minimal"]["rate"]["estimate"]
        if "ratio_vs_minimal" in s["minimal"]:
            out["ratio_vs_minimal"] = s["minimal"]["ratio_vs_minimal"]["estimate"]
    if "stack" in s:
        out["stack_msgs_per_s"] = s["stack"]["rate"]["estimate"]
    elif "saturation" in s:  # the raw-loop drains paired with the saturation drains
        out["stack_msgs_per_s"] = s["saturation"]["stack_msgs_per_s"]["estimate"]
    if "replicas" in s and "replica_cpu_ratio" in s["replicas"]:
        out["replica_cpu_ratio"] = s["replicas"]["replica_cpu_ratio"]["estimate"]
    if "replicas" in s and "one_active" in s["replicas"]:
        one_active = s["replicas"]["one_active"]["replica_cpu_ratio"]
        out["replica_cpu_ratio_one_active"] = one_active["estimate"]
    if "saturation" in s:
        out["ratio_dispatcher_vs_stack"] = s["saturation"]["ratio_dispatcher_vs_stack"]["estimate"]
    if "deepqueue" in s:
        out["ratio_queue_1m"] = s["deepqueue"]["ratio_queue_1m"]["estimate"]
    tokens = s.get("tokens")
    if tokens and tokens.get("measured"):
        out["idp_requests_per_expiry"] = tokens["idp_requests_per_expiry_max"]
    return out


def replica_pairs(paired: dict[str, Any]) -> dict[str, Any]:
    """The replicas' pairs with their rates, one and two, and the gain's interval."""
    return {
        **paired,
        "gain_interval": paired["gain"],
        "one": rate_interval([d["rate"] for d in paired["drains_one"]]).estimate,
        "two": rate_interval([d["rate"] for d in paired["drains_two"]]).estimate,
        "gain": paired["gain"]["estimate"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        report = asyncio.run(run(args))
    except KeyboardInterrupt:
        log("interrupted (the namespace was cleaned up)")
        return 130
    report["ratios"] = ratios(report)
    line = final_line(report["ratios"])
    report["final_line"] = line
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report)
    print(f"(results written to {args.output})")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
