"""Table rows of the paired sections (``bench/scenarios.py``) and of the pooled latency."""

from __future__ import annotations

from typing import Any

Row = tuple[str, str, str, str, str]


def _ratio(r: dict[str, Any], name: str) -> str:
    span = f" [{r['low']:.2f}-{r['high']:.2f}]" if r.get("low") is not None else ""
    return f"{name} {r['estimate']:.2f}{span} ({r['n']} pairs)"


def _medians(
    section: str, metric: str, first: list[dict[str, Any]], second: list[dict[str, Any]], note: str
) -> Row:
    """The dispatcher µs/run medians of two kinds of windows, side by side."""
    a = sorted(d["dispatcher_us_per_run"] for d in first)
    b = sorted(d["dispatcher_us_per_run"] for d in second)
    return (section, metric, f"{a[len(a) // 2]:,}", f"{b[len(b) // 2]:,}", note)


def _noise(n: dict[str, Any]) -> Row:
    kept = n["kept_others_cores"]
    return (
        "",
        "  other tenants' cores (min-max)",
        f"{min(kept):.2f}-{max(kept):.2f}",
        "",
        f"{n['repeats']} window(s) repeated (> 0.3 cores), {n['still_noisy']} still noisy",
    )


def scenario_rows(s: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    lat = s.get("latency") or {}
    pooled = lat.get("pooled")
    if pooled:
        o, b = pooled["ours"], pooled["baseline"]

        def ms(v: float | None) -> str:
            return "inf" if v is None else f"{v:.1f}"

        out.append(
            (
                "latency",
                "pooled submit->started p50 / p99 ms",
                f"{ms(o['p50_ms'])} / {ms(o['p99_ms'])}",
                f"{ms(b['p50_ms'])} / {ms(b['p99_ms'])}",
                f"{o['seconds']:.0f} s / {b['seconds']:.0f} s pooled, misses {o['misses']} / "
                f"{b['misses']}",
            )
        )
    rep = s.get("replicas")
    if rep and "replica_cpu_ratio" in rep:
        out.append(
            _medians(
                "replicas",
                "dispatcher CPU µs/run, 1 vs 2 (medians)",
                rep["drains_one"],
                rep["drains_two"],
                _ratio(rep["replica_cpu_ratio"], "replica_cpu_ratio"),
            )
        )
        gain = rep.get("gain_interval") or rep["gain"]
        out.append(("", "  runs/s gain (paired)", "", "", _ratio(gain, "gain")))
        out.append(_noise(rep["noise"]))
        paced = rep.get("paced")
        if paced:
            out.append(
                _medians(
                    "",
                    f"  µs/run paced at {paced['rate']:.0f}/s, 1 vs 2",
                    paced["paced_one"],
                    paced["paced_two"],
                    _ratio(paced["replica_cpu_ratio_paced"], "paced ratio"),
                )
            )
            out.append(_noise(paced["noise"]))
    one_active = (rep or {}).get("one_active")
    if one_active:
        out.append(
            _medians(
                "",
                "  active_replicas=one: µs/run, 1 vs 2",
                one_active["drains_one"],
                one_active["drains_two"],
                _ratio(one_active["replica_cpu_ratio"], "replica_cpu_ratio_one_active"),
            )
        )
        out.append(
            ("", "  runs/s gain (paired)", "", "", _ratio(one_active["gain_interval"], "gain"))
        )
        out.append(_noise(one_active["noise"]))
    sat = s.get("saturation")
    if sat:
        out.append(
            (
                "saturation",
                "dispatcher msgs/s (simulated fleet) vs raw loop",
                f"{sat['msgs_per_s']['estimate']:,.0f}",
                f"{sat['stack_msgs_per_s']['estimate']:,.0f}",
                _ratio(sat["ratio_dispatcher_vs_stack"], "ratio_dispatcher_vs_stack"),
            )
        )
        out.append(
            (
                "",
                "  runs/s; msgs per run; dispatcher µs/msg",
                f"{sat['runs_per_s']['estimate']:,.0f}",
                f"{sat['msgs_per_run']:.2f}",
                f"{sat['dispatcher_us_per_msg']:,} µs/msg",
            )
        )
        out.append(_noise(sat["noise"]))
    deep = s.get("deepqueue")
    if deep:
        out.append(
            _medians(
                "deep queue",
                f"dispatcher µs/run, 10 vs {deep['queued']:,} in target",
                deep["drains_small"],
                deep["drains_large"],
                _ratio(deep["ratio_queue_1m"], "ratio_queue_1m"),
            )
        )
        out.append(("", "  runs/s large / small (paired)", "", "", _ratio(deep["rate_ratio"], "")))
        out.append(_noise(deep["noise"]))
    return out
