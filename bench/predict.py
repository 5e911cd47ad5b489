"""The ``predict`` section of ``python -m bench``: what foresight costs and how right it is.

* accuracy: the forecast's median relative error on bursts of mixed durations (1-3 s, three
  flows, one machine with two slots, two accounts) against the true outcome, next to the naive
  "position x mean / slots" (``bench.forecast_cost.accuracy``, pure, this process);
* cost: the forecast is not part of the placement pass; it runs in the forecast chore (one
  replica, every ``RUNDISPATCH_FORECAST_INTERVAL_S``). Its cost per placement pass is what it
  takes of the dispatcher process while runs are placed: drains with the chore at its default
  period and with it off (period of an hour: it runs once at start), interleaved, comparing the
  drain rate and the dispatcher's CPU microseconds per run;
* the core work of one chore for one target with a full queue head
  (``RUNDISPATCH_FORECAST_MAX_RUNS`` = 500 runs), timed in this process.
"""

from __future__ import annotations

import random
from typing import Any

from bench.forecast_cost import NOW, accuracy, connections, fleet, model, queue, timed
from bench.runner import Bench, median_of
from dispatcher.core.forecast import predict_starts
from dispatcher.core.misses import predicted_misses

OFF = {"RUNDISPATCH_FORECAST_INTERVAL_S": "3600"}


def forecast_cost_ms(queued: int, machines: int) -> dict[str, float]:
    """One forecast chore's core work for one target (``predict_starts`` and
    ``predicted_misses`` of ``queued`` runs in 10 lanes, every slot busy), this process."""
    rng = random.Random(3)
    learned = model(rng)
    conns = connections(10)
    views = fleet(machines, slots=10, busy_users=10)
    runs = queue(rng, queued, lanes=10)

    def once() -> object:
        predictions = predict_starts(runs, views, conns, learned, NOW)
        return predicted_misses(runs, views, conns, learned, NOW, predictions=predictions)

    return {"queued": queued, "machines": machines, "ms": round(timed(once, 5) * 1e3, 1)}


async def predict_section(bench: Bench, runs: int, reps: int, log: Any) -> dict[str, Any]:
    log("predict: forecast accuracy (pure), then drains with the forecast chore on and off")
    result: dict[str, Any] = {
        "accuracy": accuracy(20),
        "chore_core": [forecast_cost_ms(500, 10), forecast_cost_ms(500, 50)],
    }
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    default_env = dict(bench.procs.env)
    try:
        for _ in range(reps):
            bench.procs.env = default_env
            on.append(await bench.drain("ours", runs, label="predict-on"))
            bench.procs.env = {**default_env, **OFF}
            off.append(await bench.drain("ours", runs, label="predict-off"))
    finally:
        bench.procs.env = default_env
    result["chore_on"] = {
        "rate": median_of(on, "rate"),
        "dispatcher_us_per_run": median_of(on, "dispatcher_us_per_run"),
    }
    result["chore_off"] = {
        "rate": median_of(off, "rate"),
        "dispatcher_us_per_run": median_of(off, "dispatcher_us_per_run"),
    }
    result["rate_ratio_on_off"] = round(result["chore_on"]["rate"] / result["chore_off"]["rate"], 3)
    result["drains"] = {"on": on, "off": off}
    return result
