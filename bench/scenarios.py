"""The paired sections of ``python -m bench``: every ratio from at least 5 interleaved pairs
with its 95 % interval, and windows where other processes used more than 0.3 cores measured
again (``bench.stats.guarded``, counted).

* ``saturation``: the dispatcher alone at saturation. Requests pre-filled, the live machines'
  workers replaced by one cheap fleet simulator (``bench/simfleet.py``), the messages the
  dispatcher consumed per second (requests, start and finish requests) against the raw
  one-hop loop's msgs/s (``bench/minimal/stack.py``), drained right after each of ours:
  ``ratio_dispatcher_vs_stack``;
* ``deepqueue``: 1,000,000 runs queued on the drained target (group ``live``) across 100
  lanes, attended runs of 100 connections that wait for a session the live machines do not
  have. The drain with them visible to the dispatcher and without (the target's queue and
  lane index renamed aside, O(1)) alternate: ``ratio_queue_1m`` = dispatcher CPU µs per run
  with / without;
* ``replicas`` (paired): drains with two dispatcher processes and with one, alternately:
  ``replica_cpu_ratio`` = dispatcher CPU µs per run (both processes) two / one, and the gain
  in runs/s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.fleet import LIVE_SLOTS, OWNER, credentials_admission, fleet_document
from bench.runner import Bench
from bench.stats import Guarded, guarded, paired_ratio, rate_interval
from dispatcher.adapters.redis.codec import Calls
from dispatcher.adapters.redis.scripts import ScriptRunner
from dispatcher.models import Mode, RunRequest

MAX_REPEATS = 2
DEEP_LANES = 100
DEEP_TARGET = "g:live"


def _others(result: dict[str, Any]) -> float:
    return float(result["others_cores"])


async def _window(measure: Callable[[], Awaitable[dict[str, Any]]]) -> Guarded[dict[str, Any]]:
    return await guarded(measure, _others, max_repeats=MAX_REPEATS)


def noise(windows: list[Guarded[dict[str, Any]]]) -> dict[str, Any]:
    return {
        "limit_cores": 0.3,
        "windows": len(windows),
        "repeats": sum(w.repeats for w in windows),
        "still_noisy": sum(1 for w in windows if not w.quiet),
        "kept_others_cores": [w.others_cores for w in windows],
        "repeated_others_cores": [o for w in windows for o in w.discarded_others],
    }


# ---- dispatcher-only saturation --------------------------------------------------------------
async def saturation(bench: Bench, limits: Any, pairs: int, runs: int, messages: int) -> dict:
    """``pairs`` x (our drain with the simulated fleet, a raw-loop drain), each guarded."""
    bench.stop_workers("ours")
    bench.simulated = True
    ours: list[Guarded[dict[str, Any]]] = []
    try:
        for _ in range(pairs):
            ours.append(await _window(lambda: _sim_drain(bench, runs)))
            await limits.stack_drain(messages)
    finally:
        bench.stop_workers("ours")
        bench.simulated = False
    stack = limits.stack[-pairs:]
    mine = [w.result["msgs_per_s"] for w in ours]
    theirs = [w.result["rate"] for w in stack]
    return {
        "drains": [w.result for w in ours],
        "msgs_per_s": rate_interval(mine).as_dict(),
        "runs_per_s": rate_interval([w.result["rate"] for w in ours]).as_dict(),
        "stack_msgs_per_s": rate_interval(theirs).as_dict(),
        "ratio_dispatcher_vs_stack": paired_ratio(mine, theirs).as_dict(),
        "msgs_per_run": round(sum(w.result["msgs_per_run"] for w in ours) / len(ours), 3),
        "dispatcher_us_per_msg": round(
            sum(w.result["dispatcher_us_per_run"] / w.result["msgs_per_run"] for w in ours)
            / len(ours)
        ),
        "noise": noise(ours),
        "stack_noise": noise(list(stack)),
    }


async def _sim_drain(bench: Bench, runs: int) -> dict[str, Any]:
    """One drain with the simulated fleet; the messages the dispatcher consumed per run are
    the requests plus the simulator's start and finish requests of the drain."""
    await bench.ensure_workers("ours")
    before = bench.sim_counts()
    result = await bench.drain("ours", runs, label="saturation")
    await _settle_counts()
    after = bench.sim_counts()
    reports = (after["start"] - before["start"]) + (after["finish"] - before["finish"])
    result["reports"] = reports
    result["msgs_per_run"] = round((runs + reports) / runs, 3)
    result["msgs_per_s"] = round(result["rate"] * result["msgs_per_run"], 1)
    bench.log(f"    {result['msgs_per_s']:.0f} msgs/s ({result['msgs_per_run']:.2f} per run)")
    return result


async def _settle_counts() -> None:
    import asyncio

    await asyncio.sleep(0.6)  # the simulator writes its counts every 0.5 s


# ---- 1,000,000 queued in the drained target ---------------------------------------------------
class DeepQueue:
    """Waiting runs on the drained target, shown to the dispatcher or parked aside."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.names = bench.names
        self.saved_lanes: list[tuple[bytes, float]] = []
        self.visible = True

    async def fill(self, total: int, lanes: int = DEEP_LANES, chunk: int = 2000) -> float:
        """Register ``lanes`` attended connections on group ``live`` and queue ``total`` runs
        over them through the admit script (pipelined), as the dispatcher admits them."""
        bench = self.bench
        document = fleet_document(bench.live, bench.fleet_small)
        document["connections"] += [
            {
                "connection_id": f"c-deep-{i:03d}",
                "owner": OWNER,
                "kind": "credentials",
                "target": {"group_id": "live"},
                "username": f"CONTOSO\\deep-{i:03d}",
                "password": "bench-password",
            }
            for i in range(lanes)
        ]
        path = bench.workdir / "fleet-deep.json"
        path.write_text(json.dumps(document))
        bench.apply_document(path)
        settings = bench.settings
        calls = Calls(self.names, settings.retention_s)
        scripts = ScriptRunner(bench.redis)
        await bench.redis.script_load(scripts.scripts["admit"].script)
        began = time.perf_counter()
        now = time.time() - 3600  # older than any drained run: the lanes' heads come first
        # One admission per lane built by the product's codec, then copied per run with its
        # run id in place of the template's (building a request and an admission per run
        # made the fill take minutes). Every run of a lane has the same score: ties are
        # ordered by run id, as the admit script stores them.
        templates = []
        for lane in range(lanes):
            placeholder = f"deep-template-{lane:03d}"
            request = RunRequest(
                run_id=placeholder,
                flow_id="bench-deep",
                connection_id=f"c-deep-{lane:03d}",
                requested_by=OWNER,
                mode=Mode.attended,
                inputs={"duration_s": 0},
            )
            keys, args = calls.admit(credentials_admission(request, DEEP_TARGET, now, settings))
            templates.append((placeholder, [*keys, *args], len(keys)))
        sha = scripts.sha("admit")
        for first in range(0, total, chunk):
            pipe = bench.redis.pipeline(transaction=False)
            for i in range(first, min(total, first + chunk)):
                placeholder, values, nkeys = templates[i % lanes]
                run_id = f"deep-{i}"
                pipe.evalsha(
                    sha,
                    nkeys,
                    *(v.replace(placeholder, run_id) if isinstance(v, str) else v for v in values),
                )
            results = await pipe.execute()
            outbox_ids = []
            for result in results:
                if result[0] not in (b"queued", "queued"):
                    raise RuntimeError(f"a deep-queue run was not queued: {result[:2]!r}")
                outbox_ids.append(result[1][0])
            await bench.redis.xdel(self.names.outbox, *outbox_ids)
            if first and first % 200_000 == 0:
                bench.log(f"    {first:,} queued ({time.perf_counter() - began:.0f} s)")
        return time.perf_counter() - began

    async def hide(self) -> None:
        """Rename the target's queue aside and take the deep lanes out of its lane index (the
        drained runs have all left both by now)."""
        if not self.visible:
            return
        redis, queue, lanes = self.bench.redis, self.names.queue(DEEP_TARGET), self._lanes()
        self.saved_lanes = await redis.zrange(lanes, 0, -1, withscores=True)
        pipe = redis.pipeline(transaction=True)
        pipe.rename(queue, f"{queue}:aside")
        pipe.delete(lanes)
        await pipe.execute()
        self.visible = False

    async def show(self) -> None:
        if self.visible:
            return
        redis, queue, lanes = self.bench.redis, self.names.queue(DEEP_TARGET), self._lanes()
        if int(await redis.zcard(queue)):
            raise RuntimeError("the drained target still has queued runs")
        pipe = redis.pipeline(transaction=True)
        pipe.rename(f"{queue}:aside", queue)
        pipe.zadd(lanes, dict(self.saved_lanes))
        await pipe.execute()
        self.visible = True

    def _lanes(self) -> str:
        return self.names.lanes(DEEP_TARGET)


async def deep_queue(bench: Bench, total: int, pairs: int, runs: int) -> dict[str, Any]:
    """``pairs`` x (drain with ``total`` queued on the target, drain without), guarded."""
    deep = DeepQueue(bench)
    fill_s = await deep.fill(total)
    bench.log(f"  {total:,} runs queued on {DEEP_TARGET} in {fill_s:.0f} s")
    large: list[Guarded[dict[str, Any]]] = []
    small: list[Guarded[dict[str, Any]]] = []

    async def drain_with(visible: bool) -> dict[str, Any]:
        await (deep.show() if visible else deep.hide())
        label = f"deep-{total}" if visible else "deep-10"
        return await bench.drain("ours", runs, label=label)

    try:
        for _ in range(pairs):
            large.append(await _window(lambda: drain_with(True)))
            small.append(await _window(lambda: drain_with(False)))
    finally:
        await deep.hide()  # the sections after this one see the target as before
    cost_large = [w.result["dispatcher_us_per_run"] for w in large]
    cost_small = [w.result["dispatcher_us_per_run"] for w in small]
    return {
        "queued": total,
        "lanes": DEEP_LANES,
        "target": DEEP_TARGET,
        "fill_s": round(fill_s, 1),
        "drains_large": [w.result for w in large],
        "drains_small": [w.result for w in small],
        "ratio_queue_1m": paired_ratio(cost_large, cost_small).as_dict(),
        "rate_ratio": paired_ratio(
            [w.result["rate"] for w in large], [w.result["rate"] for w in small]
        ).as_dict(),
        "noise": noise(large + small),
    }


# ---- replicas, paired --------------------------------------------------------------------------
def _cpu_ratio(two: list[Guarded[dict[str, Any]]], one: list[Guarded[dict[str, Any]]]) -> dict:
    """Dispatcher CPU µs per run, two processes / one, paired."""
    return paired_ratio(
        [w.result["dispatcher_us_per_run"] for w in two],
        [w.result["dispatcher_us_per_run"] for w in one],
    ).as_dict()


async def replicas_paced(bench: Bench, pairs: int, rate: float, seconds: float) -> dict:
    """``pairs`` x (two dispatcher processes, one) under the same paced load (``rate`` runs/s
    for ``seconds``), each guarded: the dispatcher CPU per run where neither configuration
    saturates the machine, two / one (paired)."""
    two: list[Guarded[dict[str, Any]]] = []
    one: list[Guarded[dict[str, Any]]] = []
    for _ in range(pairs):
        two.append(await _window(lambda: bench.paced("ours", rate, seconds, dispatchers=2)))
        one.append(await _window(lambda: bench.paced("ours", rate, seconds)))
    for window in two + one:
        window.result.pop("_started_ms", None)  # latency samples: not this figure's
    return {
        "rate": rate,
        "seconds": seconds,
        "paced_two": [w.result for w in two],
        "paced_one": [w.result for w in one],
        "replica_cpu_ratio_paced": _cpu_ratio(two, one),
        "noise": noise(two + one),
    }


async def replicas(bench: Bench, pairs: int, runs: int) -> dict[str, Any]:
    two: list[Guarded[dict[str, Any]]] = []
    one: list[Guarded[dict[str, Any]]] = []
    for _ in range(pairs):
        two.append(
            await _window(
                lambda: bench.drain(
                    "ours", runs, dispatchers=2, label="replicas-2", serve_first=True
                )
            )
        )
        one.append(
            await _window(lambda: bench.drain("ours", runs, label="replicas-1", serve_first=True))
        )
    return {
        "drains_two": [w.result for w in two],
        "drains_one": [w.result for w in one],
        "replica_cpu_ratio": _cpu_ratio(two, one),
        "gain": paired_ratio(
            [w.result["rate"] for w in two], [w.result["rate"] for w in one]
        ).as_dict(),
        "slots": LIVE_SLOTS * len(bench.live),
        "noise": noise(two + one),
    }
