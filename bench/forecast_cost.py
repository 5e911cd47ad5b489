"""CPU cost and accuracy of the pure forecast and capacity replay (no services needed).

    .venv/bin/python -m bench.forecast_cost [--quick]

Prints, for queue heads and fleets of several sizes, the time one ``predict_starts`` and one
``predicted_misses`` take (median of repeats, this process, one core), the capacity replay's
speed in runs per second, and the forecast's median relative error against the actual waits
of a mixed-duration burst next to the naive "position x mean / slots" (the actual waits come
from replaying the burst with its true slot times). Timings are wall-clock on a shared machine:
compare them with each other, and take them with the usual noise (bench/README.md).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from dispatcher.core.capacity import replay
from dispatcher.core.forecast import QueuedRun, predict_starts
from dispatcher.core.misses import predicted_misses
from dispatcher.core.service_model import ServiceModel
from dispatcher.core.trace import TraceRecord
from dispatcher.models import (
    AssignedRun,
    Connection,
    ConnectionKind,
    Machine,
    MachineView,
    Mode,
    Priority,
    RunStatus,
    Target,
)

FLOWS = {"quick": (0.8, 1.2), "medium": (1.7, 2.3), "slow": (2.6, 3.0)}
NOW = 100_000.0


def connections(count: int) -> dict[str, Connection]:
    return {
        f"c{i}": Connection(
            connection_id=f"c{i}",
            owner="o@contoso.com",
            kind=ConnectionKind.credentials,
            target=Target(group_id="g"),
            username=f"CONTOSO\\bot{i}",
        )
        for i in range(count)
    }


def fleet(machines: int, slots: int, busy_users: int) -> list[MachineView]:
    """A group whose machines each run ``busy_users`` runs (one per account)."""
    views = []
    for index in range(machines):
        assigned = tuple(
            AssignedRun(run_id=f"m{index}-busy{u}", mode=Mode.unattended, user=f"contoso\\bot{u}",
                        fence=1)
            for u in range(busy_users)
        )  # fmt: skip
        machine = Machine(
            machine_id=f"m{index}", name=f"M{index}", group_id="g", max_unattended_runs=slots
        )
        views.append(MachineView(machine=machine, online=True, assigned=assigned))
    return views


def model(rng: random.Random, runs: int = 200) -> ServiceModel:
    learned = ServiceModel()
    for index in range(runs):
        flow = rng.choice(list(FLOWS))
        at = NOW - runs + index
        learned.observe(
            ConnectionKind.credentials, flow, dispatched_at=at - rng.uniform(*FLOWS[flow]),
            finished_at=at,
        )  # fmt: skip
    return learned


def queue(rng: random.Random, count: int, lanes: int) -> list[QueuedRun]:
    return [
        QueuedRun(f"r{i:06d}", f"c{i % lanes}", Mode.unattended, rng.choice(list(FLOWS)),
                  NOW + rng.uniform(10, 3600))
        for i in range(count)
    ]  # fmt: skip


def timed(action: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of ``action`` over ``repeats`` runs."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def cost_table(quick: bool) -> None:
    rng = random.Random(1)
    learned = model(rng)
    print(
        "predict_starts / predicted_misses, one call (ms): queue head x machines, 10 lanes, "
        "every slot busy (runs queue when the slots are full)"
    )
    print(f"{'queued':>7} {'machines':>8} {'slots':>5} {'predict':>9} {'misses':>9}")
    conns = connections(10)
    sizes = [(50, 2), (200, 10), (1000, 10), (200, 50)] if quick else [
        (50, 2), (200, 2), (200, 10), (1000, 10), (200, 50), (1000, 50), (5000, 50),
    ]  # fmt: skip
    for count, machines in sizes:
        views = fleet(machines, slots=10, busy_users=10)
        runs = queue(rng, count, lanes=10)
        repeats = 3 if count >= 1000 else 7

        def predict(runs: list[QueuedRun] = runs, views: list[MachineView] = views) -> object:
            return predict_starts(runs, views, conns, learned, NOW)

        def misses(runs: list[QueuedRun] = runs, views: list[MachineView] = views) -> object:
            return predicted_misses(runs, views, conns, learned, NOW)

        predict_s, misses_s = timed(predict, repeats), timed(misses, repeats)
        print(f"{count:>7} {machines:>8} {10:>5} {predict_s * 1e3:>9.1f} {misses_s * 1e3:>9.1f}")


def replay_speed(quick: bool) -> None:
    rng = random.Random(2)
    count = 5_000 if quick else 20_000
    conns = connections(10)
    views = fleet(10, slots=5, busy_users=0)
    records = []
    for index in range(count):
        at = index * 0.25
        flow = rng.choice(list(FLOWS))
        records.append(
            TraceRecord(
                run_id=f"r{index:06d}", target="g:g", connection_id=f"c{index % 10}",
                kind=ConnectionKind.credentials, mode=Mode.unattended, priority=Priority.normal,
                flow_id=flow, queued_at=at, queue_deadline=at + 60, status=RunStatus.succeeded,
                dispatched_at=at, finished_at=at + 10 * rng.uniform(*FLOWS[flow]),
            )
        )  # fmt: skip
    seconds = timed(lambda: replay(records, views, conns, priority_boost_s=3600), 1)
    print(f"replay: {count} runs, 10 machines x 5 slots, 10 accounts: {seconds:.2f} s, "
          f"{count / seconds:,.0f} runs/s")  # fmt: skip


def accuracy(seeds: int) -> dict[str, float]:
    """One machine with 2 slots, 30 runs of 1-3 s from two accounts, predicted at enqueue:
    the median (over bursts) of each burst's median relative error, forecast and naive."""
    ours_all, naive_all = [], []
    conns = connections(2)
    views = fleet(1, slots=2, busy_users=0)
    for seed in range(seeds):
        rng = random.Random(seed)
        learned = model(rng, runs=60)
        runs = queue(rng, 30, lanes=2)
        truth = {run.run_id: rng.uniform(*FLOWS[run.flow_id or "quick"]) for run in runs}
        records = [
            TraceRecord(
                run_id=run.run_id, target="g:g", connection_id=run.connection_id,
                kind=ConnectionKind.credentials, mode=run.mode, priority=run.priority,
                flow_id=run.flow_id or "", queued_at=NOW + i * 1e-6, queue_deadline=NOW + 7200,
                status=RunStatus.succeeded, dispatched_at=NOW, finished_at=NOW + truth[run.run_id],
            )
            for i, run in enumerate(runs)
        ]  # fmt: skip
        actual = replay(records, views, conns, priority_boost_s=3600)
        predicted = predict_starts(
            [r.__class__(r.run_id, r.connection_id, r.mode, r.flow_id, NOW + 7200) for r in runs],
            views, conns, learned, NOW,
        )  # fmt: skip
        mean = learned.estimate(ConnectionKind.credentials, None, NOW).mean
        ours, naive = [], []
        for index, (run, prediction) in enumerate(zip(runs, predicted, strict=True)):
            wait = actual[run.run_id].waited or 0.0
            if wait > 0 and prediction.start_at is not None:
                ours.append(abs(prediction.start_at - NOW - wait) / wait)
                naive.append(abs(index * mean / 2 - wait) / wait)
        ours_all.append(statistics.median(ours))
        naive_all.append(statistics.median(naive))
    result = {
        "bursts": seeds,
        "forecast": round(statistics.median(ours_all), 4),
        "forecast_worst": round(max(ours_all), 4),
        "naive": round(statistics.median(naive_all), 4),
        "naive_worst": round(max(naive_all), 4),
    }
    print(
        f"accuracy over {seeds} bursts (1 machine, 2 slots, 30 runs of 1-3 s, 3 flows): median "
        f"relative error forecast {result['forecast']:.3f} (worst {result['forecast_worst']:.3f})"
        f", naive {result['naive']:.3f} (worst {result['naive_worst']:.3f})"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and bursts")
    args = parser.parse_args()
    accuracy(20 if args.quick else 100)
    cost_table(args.quick)
    replay_speed(args.quick)


if __name__ == "__main__":
    main()
