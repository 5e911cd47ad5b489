"""Synthetic workloads for the forecast and the capacity replay: flows of known durations on a
small fleet, a history to learn from, and the true outcome played by the replay."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from dispatcher.core.capacity import replay
from dispatcher.core.forecast import QueuedRun
from dispatcher.core.service_model import ServiceModel
from dispatcher.core.trace import TraceRecord
from dispatcher.models import Connection, ConnectionKind, Mode, Priority, RunStatus
from tests.support.builders import credentials

# Flows of the acceptance scenario: every run takes 1-3 s, each flow in its own band.
FLOWS = {"quick": (0.8, 1.2), "medium": (1.7, 2.3), "slow": (2.6, 3.0)}
HOUR = 3600.0


def users(count: int) -> dict[str, Connection]:
    """Credentials connections on machine m1, one Windows account each."""
    return {
        f"c{index}": credentials(connection_id=f"c{index}", username=f"CONTOSO\\bot{index}")
        for index in range(count)
    }


def slot_time(rng: random.Random, flow: str) -> float:
    low, high = FLOWS[flow]
    return rng.uniform(low, high)


def learned_model(rng: random.Random, runs: int = 60) -> ServiceModel:
    """A target's model after ``runs`` completed runs of the flows, a second apart."""
    model = ServiceModel()
    for index in range(runs):
        flow = rng.choice(list(FLOWS))
        at = 100.0 + index
        model.observe(
            ConnectionKind.credentials,
            flow,
            dispatched_at=at - slot_time(rng, flow),
            finished_at=at,
        )
    return model


@dataclass(frozen=True)
class Burst:
    """Runs queued at once at ``now`` (round robin over connections), with true slot times."""

    now: float
    queued: list[QueuedRun]
    truth: dict[str, float]

    def records(self, target: str = "m:m1") -> list[TraceRecord]:
        """The burst as the replay reads it; queue order by a tiny offset per position."""
        return [
            TraceRecord(
                run_id=run.run_id,
                target=target,
                connection_id=run.connection_id,
                kind=ConnectionKind.credentials,
                mode=run.mode,
                priority=Priority.normal,
                flow_id=run.flow_id or "",
                queued_at=self.now + index * 1e-6,
                queue_deadline=run.queue_deadline or self.now + HOUR,
                status=RunStatus.succeeded,
                dispatched_at=self.now,
                finished_at=self.now + self.truth[run.run_id],
            )
            for index, run in enumerate(self.queued)
        ]


def burst(rng: random.Random, count: int, connections: int, now: float = 10_000.0) -> Burst:
    queued: list[QueuedRun] = []
    truth: dict[str, float] = {}
    for index in range(count):
        flow = rng.choice(list(FLOWS))
        run_id = f"r{index:03d}"
        truth[run_id] = slot_time(rng, flow)
        queued.append(
            QueuedRun(run_id, f"c{index % connections}", Mode.unattended, flow, now + HOUR)
        )
    return Burst(now, queued, truth)


def actual_waits(
    scenario: Burst, views: list, connections: dict[str, Connection]
) -> dict[str, float]:
    """When each run of the burst is really handed over, played with its true slot time."""
    outcome = replay(scenario.records(), views, connections, priority_boost_s=HOUR)
    waits = {run_id: result.waited for run_id, result in outcome.items()}
    assert all(wait is not None for wait in waits.values())
    return {run_id: wait for run_id, wait in waits.items() if wait is not None}


def median_relative_error(predicted: dict[str, float], actual: dict[str, float]) -> float:
    """Median over the runs that waited of |predicted wait - actual wait| / actual wait."""
    return statistics.median(
        abs(predicted[run_id] - wait) / wait for run_id, wait in actual.items() if wait > 0
    )
