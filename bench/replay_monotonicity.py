"""Does a capacity replay ever time out more runs with machines added? (no services needed)

    .venv/bin/python -m bench.replay_monotonicity [--traces N] [--seed S]

Three searches over random traces (arrivals, deadlines and slot times drawn at random):

* ``one account``: runs of one account on 1-3 identical machines, 1-3 to be added;
* ``several accounts``: 2-5 accounts on 1-3 identical machines;
* ``unequal machines, every seed``: 2-3 accounts on 1-2 machines of 1-3 slots each, one machine
  added; a trace counts only if the larger fleet times out more for each of 12 tie-break seeds
  (the placer breaks ties between equally loaded machines at random, so one replay can be
  unlucky; ``what_if`` reports the median of several).

Prints how many traces timed out more runs with machines added, per search.
"""

from __future__ import annotations

import argparse
import random

from dispatcher.core.capacity import replay, resize_fleet, summarize
from dispatcher.core.trace import TraceRecord
from dispatcher.models import (
    Connection,
    ConnectionKind,
    Machine,
    MachineView,
    Mode,
    Priority,
    RunStatus,
    Target,
)

BOOST = 3600.0


def accounts(count: int) -> dict[str, Connection]:
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


def machines(slots: list[int]) -> list[MachineView]:
    return [
        MachineView(
            machine=Machine(machine_id=f"m{i}", name=f"M{i}", group_id="g", max_unattended_runs=n),
            online=True,
        )
        for i, n in enumerate(slots)
    ]


def trace(rng: random.Random, runs: int, connections: int, spread: float) -> list[TraceRecord]:
    records = []
    for index in range(runs):
        at = round(rng.uniform(0, spread), 1)
        account = f"c{rng.randrange(connections)}"
        records.append(
            TraceRecord(
                run_id=f"r{index:02d}", target="g:g", connection_id=account,
                kind=ConnectionKind.credentials, mode=Mode.unattended, priority=Priority.normal,
                flow_id="f", queued_at=at, queue_deadline=at + round(rng.uniform(0.5, 15), 1),
                status=RunStatus.succeeded, dispatched_at=0.0,
                finished_at=round(rng.uniform(0.5, 10), 1),
            )
        )  # fmt: skip
    return records


def more_time_outs(
    records: list[TraceRecord], views: list[MachineView], add: int, seeds: range
) -> bool:
    """True when the larger fleet times out more runs than today's for every seed."""
    conns = accounts(1 + max(int(r.connection_id[1:]) for r in records))
    bigger, clones = resize_fleet(views, "g:g", add)
    for seed in seeds:
        today = replay(records, views, conns, priority_boost_s=BOOST, seed=seed)
        more = replay(records, bigger, conns, priority_boost_s=BOOST, clones=clones, seed=seed)
        if summarize(records, more, 0).timed_out <= summarize(records, today, 0).timed_out:
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=30_000, help="traces per search")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for name, connections, unequal in (
        ("one account", lambda: 1, False),
        ("several accounts", lambda: rng.randint(2, 5), False),
        ("unequal machines, every seed", lambda: rng.randint(2, 3), True),
    ):
        found = 0
        for case in range(args.traces):
            if unequal:
                views = machines([rng.randint(1, 3) for _ in range(rng.randint(1, 2))])
                records = trace(rng, rng.randint(2, 7), connections(), spread=10)
                found += more_time_outs(records, views, 1, range(12))
            else:
                slots = rng.randint(1, 3)
                views = machines([slots] * rng.randint(1, 3))
                records = trace(rng, rng.randint(1, 25), connections(), spread=20)
                found += more_time_outs(records, views, rng.randint(1, 3), range(case, case + 1))
        print(f"{name}: {found} of {args.traces} traces time out more runs with machines added")


if __name__ == "__main__":
    main()
