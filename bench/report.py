"""The table, the final line, the hop count and the profile summary."""

from __future__ import annotations

import math
from typing import Any

from bench.limits import limit_rows
from bench.scenario_rows import scenario_rows


def hops() -> dict[str, Any]:
    """AMQP hops and Redis round trips per run, counted from the code (see README)."""
    return {
        "amqp_publishes_per_run": {
            "count": 6,
            "what": "request (client), run.queued, run.dispatched, assignment (dispatcher), "
            "run.started, run.succeeded (worker); persistent, confirmed",
        },
        "amqp_deliveries_per_run": {
            "count": 3,
            "what": "request -> dispatcher, assignment -> worker, run.succeeded -> signals "
            "queue -> dispatcher; each acked",
        },
        "redis_round_trips_per_run": {
            "ours": {
                "dispatcher_per_run": 5,
                "dispatcher_per_run_what": "admit.lua; GET live heartbeat, claim.lua, XDEL "
                "outbox, ZRANGE next head (sequential, per placed run)",
                "dispatcher_per_request_batch": 2,
                "dispatcher_per_request_batch_what": "GET fleet version, XDEL outbox",
                "dispatcher_per_placement_pass": 4,
                "dispatcher_per_placement_pass_what": "GET fleet version, ZRANGE lanes, "
                "pipeline of lane heads, pipeline of machine views",
                "dispatcher_per_signal_batch": 1,
                "worker_per_run": 4,
                "worker_per_run_what": "start.lua, XDEL, finish.lua, XDEL",
                "serial_confirm_waits_per_run": 3,
                "serial_confirm_waits_what": "dispatcher: 1 per placed run (2 publishes); "
                "worker: run.started, run.succeeded",
            },
            "baseline": {
                "redis_commands_per_run": 9,
                "what": "the same commands per run, one pipeline per stage and batch: "
                "dispatcher 11 round trips per batch of <=100, worker 4 per batch of <=20; "
                "publishes of a stage gathered, one ack(multiple=True) per batch",
            },
        },
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    s = report["sections"]
    r = report.get("ratios", {})
    out: list[tuple[str, str, str, str, str]] = []
    thr, base = s.get("throughput"), s.get("baseline")
    if thr or base:
        ours_d = thr["drains"] if thr else []
        base_d = base["drains"] if base else []

        def med(drains: list[dict[str, Any]], key: str) -> float | None:
            if not drains:
                return None
            values = sorted(d[key] for d in drains)
            return float(values[len(values) // 2])

        def spread(drains: list[dict[str, Any]]) -> str:
            if len(drains) < 2:
                return ""
            rates = [d["rate"] for d in drains]
            return f"{min(rates):.0f}-{max(rates):.0f}"

        out.append(
            (
                "throughput",
                "runs/s submit->succeeded (drain, median)",
                _fmt(thr and thr["rate"]),
                _fmt(base and base["rate"]),
                f"ratio {_fmt(r.get('ratio_throughput'), 2)}",
            )
        )
        out.append(("", "  range of the drains", spread(ours_d), spread(base_d), ""))
        for key, label in (
            ("dispatcher_us_per_run", "  dispatcher CPU µs/run"),
            ("worker_us_per_run", "  workers CPU µs/run"),
            ("rabbit_us_per_run", "  RabbitMQ CPU µs/run"),
            ("dispatcher_cores", "  dispatcher cores"),
            ("worker_cores", "  workers cores"),
            ("rabbit_cores", "  RabbitMQ cores"),
            ("machine_busy", "  machine busy cores (steal)"),
            ("others_cores", "  other tenants' cores (noise)"),
        ):
            ours_v, base_v = med(ours_d, key), med(base_d, key)
            if key == "machine_busy":
                o = f"{_fmt(ours_v, 2)} ({_fmt(med(ours_d, 'steal'), 2)})" if ours_d else "-"
                b = f"{_fmt(base_v, 2)} ({_fmt(med(base_d, 'steal'), 2)})" if base_d else "-"
                out.append(("", label, o, b, ""))
            else:
                digits = 2 if "cores" in key else 0
                out.append(("", label, _fmt(ours_v, digits), _fmt(base_v, digits), ""))
    lat = s.get("latency")
    if lat:
        o, b = lat["ours"], lat["baseline"]
        out.append(
            (
                "latency",
                f"offered {lat['rate']:.0f}/s (50 % of max); achieved",
                _fmt(o["achieved_rate"]),
                _fmt(b["achieved_rate"]),
                "",
            )
        )
        for key, label in (
            ("dispatched_p50_ms", "  submit->dispatched p50 ms"),
            ("dispatched_p99_ms", "  submit->dispatched p99 ms"),
            ("started_p50_ms", "  submit->started p50 ms"),
            ("started_p99_ms", "  submit->started p99 ms"),
        ):
            note = ""
            if key == "started_p99_ms":
                note = f"ratio_p99 {_fmt(r.get('ratio_p99'), 2)}"
            elif key == "dispatched_p99_ms":
                note = f"ratio {_fmt(r.get('ratio_p99_dispatched'), 2)}"
            out.append(("", label, _fmt(o[key]), _fmt(b[key]), note))
        for stage, values in (o.get("stages") or {}).items():
            out.append(
                (
                    "",
                    f"  ours: {stage.replace('_', ' ')} p50 / p99",
                    f"{_fmt(values['p50_ms'])} / {_fmt(values['p99_ms'])}",
                    "",
                    "from the run's timestamps",
                )
            )
        out.append(
            (
                "",
                f"  slots in use mean / max (of {o.get('slots_total', '?')})",
                f"{_fmt(o.get('slots_used_mean'))} / {_fmt(o.get('slots_used_max'))}",
                f"{_fmt(b.get('slots_used_mean'))} / {_fmt(b.get('slots_used_max'))}",
                "runs on the machines",
            )
        )
        out.append(
            (
                "",
                "  started p50, first / last fifth",
                f"{_fmt(o['started_p50_first_fifth_ms'])} / {_fmt(o['started_p50_last_fifth_ms'])}",
                f"{_fmt(b['started_p50_first_fifth_ms'])} / {_fmt(b['started_p50_last_fifth_ms'])}",
                "last >> first: fell behind",
            )
        )
        out.append(
            (
                "",
                "  other tenants' cores (noise)",
                _fmt(o["others_cores"], 2),
                _fmt(b["others_cores"], 2),
                "",
            )
        )
        out.append(
            (
                "",
                "  dispatcher / producer cores",
                f"{o['dispatcher_cores']:.2f} / {o['producer_cores']:.2f}",
                f"{b['dispatcher_cores']:.2f} / {b['producer_cores']:.2f}",
                "",
            )
        )
    for name, small, large in (("queue", "queued_small", "queued_large"), ("fleet", "", "")):
        sec = s.get(name)
        if not sec:
            continue
        if name == "queue":
            what = f"{sec[small]:,} vs {sec[large]:,} queued"
            ratio = f"ratio_queue_scale {_fmt(sec['ratio'], 2)}"
        else:
            what = f"{sec['machines_small']:,} vs {sec['machines_large']:,} machines"
            ratio = f"ratio_fleet_scale {_fmt(sec['ratio'], 2)}"
        out.append(
            (
                f"{name} scale",
                f"dispatcher CPU µs/run, {what}",
                _fmt(sec["cost_small_us"], 0),
                _fmt(sec["cost_large_us"], 0),
                ratio,
            )
        )
        out.append(
            (
                "",
                "  runs/s (small / large)",
                _fmt(sec["rate_small"]),
                _fmt(sec["rate_large"]),
                f"ratio {_fmt(sec['rate_large'] / sec['rate_small'], 2)}",
            )
        )
    rep = s.get("replicas")
    if rep and "one" in rep:
        out.append(
            (
                "replicas",
                "runs/s, 1 vs 2 dispatcher processes",
                _fmt(rep["one"]),
                _fmt(rep["two"]),
                f"gain {_fmt(rep['gain'], 2)}",
            )
        )
    usage = (s.get("queue") or {}).get("memory") or (s.get("memory") or {}).get("usage")
    if usage:
        out.append(
            (
                "memory",
                "Redis B/queued run (MEMORY USAGE)",
                _fmt(usage["bytes_per_queued_run"]),
                "",
                f"hash {usage['hash_bytes_mean']:.0f} + idx {usage['index_bytes_per_run']:.0f}",
            )
        )
        out.append(
            (
                "",
                "  INFO used_memory delta / run",
                _fmt(usage["used_memory_delta_per_run"]),
                "",
                f"{usage['queued']:,} queued, {usage['hash_encoding']}",
            )
        )
    mem = s.get("memory")
    if mem and "rss_large" in mem:
        out.append(
            (
                "",
                "  dispatcher RSS MB (10 / large queued)",
                _fmt(mem["rss_10"]["rss_mb"]),
                _fmt(mem["rss_large"]["rss_mb"]),
                f"idle cores {mem['rss_10']['idle_cores']:.2f} / "
                f"{mem['rss_large']['idle_cores']:.2f}",
            )
        )
    hop = s.get("hops")
    if hop:
        o, b = hop["ours"], hop["baseline"]

        def both(role: str, *keys: str) -> tuple[str, str]:
            return tuple(  # type: ignore[return-value]
                f"{sum(side.get(role, {}).get(k, 0.0) for k in keys):.2f}" for side in (o, b)
            )

        for role in ("dispatcher", "worker"):
            label = "dispatcher" if role == "dispatcher" else "workers"
            first = "hops/run" if role == "dispatcher" else ""
            out.append((first, f"Redis round trips, {label}", *both(role, "redis.round_trips"), ""))
            out.append(
                (
                    "",
                    f"  Redis commands, {label}",
                    *both(role, *_commands(o, b, role=role)),
                    f"SCRIPT EXISTS {both(role, 'redis.cmd.SCRIPT EXISTS')[0]}",
                )
            )
            out.append(("", f"  AMQP publishes, {label}", *both(role, "amqp.publish"), ""))
            out.append(
                (
                    "",
                    f"  AMQP returned (unroutable), {label}",
                    *both(role, "amqp.returns"),
                    "mandatory events nobody subscribes to",
                )
            )
            out.append(
                (
                    "",
                    f"  AMQP deliveries / acks, {label}",
                    "{} / {}".format(
                        both(role, "amqp.deliveries")[0],
                        both(role, "amqp.ack", "amqp.ack_multiple")[0],
                    ),
                    "{} / {}".format(
                        both(role, "amqp.deliveries")[1],
                        both(role, "amqp.ack", "amqp.ack_multiple")[1],
                    ),
                    "",
                )
            )
    out += limit_rows(s)
    tok = s.get("tokens")
    if tok:
        if tok.get("measured"):
            out.append(
                (
                    "tokens",
                    "cache hit µs/call (wall / CPU)",
                    f"{tok['cache_hit_wall_us']:.0f} / {tok['cache_hit_cpu_us']:.0f}",
                    "",
                    f"{tok['concurrency']} at once: {tok['cache_hit_burst_wall_us_per_call']:.0f}"
                    " µs/call",
                )
            )
            out.append(
                (
                    "",
                    f"  IdP requests per expiry ({tok['concurrency']} runs)",
                    ", ".join(str(x) for x in tok["idp_requests_per_expiry"]),
                    "",
                    f"burst {tok['expiry_burst_wall_s_median']:.2f} s",
                )
            )
        else:
            out.append(("tokens", "not measured", "", "", tok.get("reason", "")[:60]))
    out += predict_rows(s.get("predict"))
    out += scenario_rows(s)
    return out


def predict_rows(pred: dict[str, Any] | None) -> list[tuple[str, str, str, str, str]]:
    """The ``predict`` section: forecast error against the naive estimate, and its cost."""
    if not pred:
        return []
    acc, on, off = pred["accuracy"], pred["chore_on"], pred["chore_off"]
    core = ", ".join(f"{c['machines']} mach. {c['ms']:.0f} ms" for c in pred["chore_core"])
    return [
        (
            "predict",
            "median rel. error, mixed 1-3 s (naive)",
            f"{acc['forecast']:.3f}",
            f"{acc['naive']:.3f}",
            f"worst {acc['forecast_worst']:.3f} ({acc['bursts']} bursts)",
        ),
        (
            "",
            "drain runs/s, chore on (off)",
            f"{on['rate']:.0f}",
            f"{off['rate']:.0f}",
            f"ratio {pred['rate_ratio_on_off']:.3f}",
        ),
        (
            "",
            "dispatcher µs/run, chore on (off)",
            f"{on['dispatcher_us_per_run']:.0f}",
            f"{off['dispatcher_us_per_run']:.0f}",
            f"one chore, 500 queued: {core}",
        ),
    ]


def _commands(*sides: dict[str, Any], role: str = "") -> list[str]:
    keys: set[str] = set()
    for side in sides:
        keys.update(k for k in side.get(role, {}) if k.startswith("redis.cmd."))
    return sorted(keys)


def print_table(report: dict[str, Any]) -> None:
    header = ("section", "metric", "ours", "baseline | scaled", "ratio / note")
    table = [header, *rows(report)]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for index, row in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if index == 0:
            print("  ".join("-" * w for w in widths))


# The keys of the final line, in order, with their decimals (None: an integer).
FINAL_KEYS: tuple[tuple[str, int | None], ...] = (
    ("ratio_throughput", 2),
    ("ratio_p99", 2),
    ("ratio_queue_scale", 2),
    ("ratio_fleet_scale", 2),
    ("redis_bytes_per_queued_run", None),
    ("idp_requests_per_expiry", None),
    ("ratio_vs_minimal", 2),
    ("minimal_runs_per_s", 1),
    ("stack_msgs_per_s", 1),
    ("ratio_dispatcher_vs_stack", 2),
    ("ratio_queue_1m", 2),
    ("replica_cpu_ratio", 2),
    ("replica_cpu_ratio_one_active", 2),
    ("p99_ms_half_load", 1),
    ("ratio_live_fleet_10k", 2),
    ("heartbeat_cpu_us", 1),
)


def final_line(ratios: dict[str, Any]) -> str:
    def value(key: str, digits: int | None) -> str:
        v = ratios.get(key)
        if v is None:
            return "n/a"
        return f"{v:.{digits}f}" if digits is not None else str(int(v))

    return " ".join(f"{key}={value(key, digits)}" for key, digits in FINAL_KEYS)
