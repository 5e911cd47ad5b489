"""How fast a target serves its runs: decayed statistics of slot times and start lags.

A sample is one run that held a slot of the target. Its *slot time* is ``finished_at -
dispatched_at``: the time placement sees the slot as taken (hand-off, flow, report), which is
what decides when the run behind it can go. Its *start lag* is ``started_at - dispatched_at``.
The *hand-over* is the time from a slot freeing to the next hand-off on it, for a run that was
waiting (the signal and the placement pass in between): it adds to every slot time.
Slot times are kept per connection kind and, finer, per (kind, flow): flows differ in duration,
and knowing which flows are ahead of a run is what lets a forecast beat "position x mean / slots".

Every statistic decays with a half-life in wall-clock time (3 h by default): the model follows a
target whose flows get slower, and after a quiet night its effective number of samples is small,
which lowers the confidence of what it predicts (and keeps fail-early off) until fresh runs come.

Slot times are ``core.durations.DurationStats``: their histograms give quantiles (the optimistic
estimate fail-early needs) and the remaining time of a run already some time in.

The model is a plain value: ``observe`` (or ``learn``, from trace records) updates it,
``to_dict``/``from_dict`` give a compact JSON-able form (bounded: at most ``MAX_FLOWS`` flows
per kind, empty buckets pruned).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.core.durations import OVERRUN_SHARE, DurationStats, number
from dispatcher.core.trace import TraceRecord
from dispatcher.models import ConnectionKind

DEFAULT_HALF_LIFE_S = 3 * 3600.0
# What a slot time is assumed to be before a target has any history (confidence is then low).
DEFAULT_PRIOR_S = 60.0
# A flow's own statistics replace its kind's once they hold this many (decayed) samples: three
# recent runs (decay makes three samples a little less than 3).
FLOW_MIN_SAMPLES = 2.5
MAX_FLOWS = 64
RECENT_FINISHES = 32  # per machine, for the hand-over samples ``learn`` takes
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Estimate:
    """What the model expects of one run's slot time, and how much that rests on.

    ``level`` says where it comes from: ``flow`` (the flow's own history), ``kind`` (every flow
    of the connection kind), ``target`` (every run of the target) or ``prior`` (no history).
    """

    mean: float
    variance: float
    samples: float
    level: str
    stats: DurationStats | None = None

    def low(self, p: float) -> float:
        """The ``p`` quantile (the optimistic slot time); 0 without history."""
        return self.stats.quantile(p) if self.stats is not None else 0.0

    def remaining(self, elapsed: float) -> tuple[float, float]:
        """Mean and variance of the rest of a run ``elapsed`` seconds in."""
        if self.stats is None:
            rest = max(self.mean - elapsed, OVERRUN_SHARE * elapsed)
            return rest, self.variance
        return self.stats.remaining(elapsed)

    def remaining_low(self, elapsed: float, p: float) -> float:
        """The optimistic rest of a run ``elapsed`` seconds in; 0 without history."""
        return max(0.0, self.stats.quantile(p, above=elapsed)) if self.stats is not None else 0.0


@dataclass
class ServiceModel:
    """One target's service: slot times per kind and per (kind, flow), start lags per kind,
    hand-overs."""

    half_life_s: float = DEFAULT_HALF_LIFE_S
    prior_s: float = DEFAULT_PRIOR_S
    kinds: dict[str, DurationStats] = field(default_factory=dict)
    flows: dict[str, dict[str, DurationStats]] = field(default_factory=dict)
    lags: dict[str, DurationStats] = field(default_factory=dict)
    handovers: DurationStats = field(default_factory=DurationStats)

    def observe(
        self,
        kind: ConnectionKind,
        flow_id: str | None,
        *,
        dispatched_at: float,
        finished_at: float,
        started_at: float | None = None,
    ) -> None:
        """Learn from a run that held a slot from ``dispatched_at`` to ``finished_at``."""
        slot_time = max(0.0, finished_at - dispatched_at)
        self.kinds.setdefault(kind.value, DurationStats()).add(
            slot_time, finished_at, self.half_life_s
        )
        if flow_id is not None:
            flows = self.flows.setdefault(kind.value, {})
            if flow_id not in flows and len(flows) >= MAX_FLOWS:
                # Bounded: the flow seen least lately makes room (its runs fall back to the kind).
                del flows[min(flows, key=lambda f: flows[f].samples(finished_at, self.half_life_s))]
            flows.setdefault(flow_id, DurationStats()).add(slot_time, finished_at, self.half_life_s)
        if started_at is not None:
            lag = max(0.0, min(started_at, finished_at) - dispatched_at)
            self.lags.setdefault(kind.value, DurationStats()).add(
                lag, finished_at, self.half_life_s
            )

    def observe_handover(self, seconds: float, at: float) -> None:
        """Learn from a waiting run handed over ``seconds`` after its slot freed (at ``at``)."""
        self.handovers.add(seconds, at, self.half_life_s)

    @property
    def handover(self) -> float:
        """Median time from a slot freeing to the next run on it (0 without history); the
        median, because a run that waited for its account rather than a slot gives a long
        "hand-over" now and then."""
        return self.handovers.quantile(0.5) if self.handovers.weight > 0 else 0.0

    def learn(self, records: Iterable[TraceRecord], finishes: dict[str, list[float]]) -> int:
        """Learn from trace records, in the order they were written (finish order); returns
        how many held a slot.

        ``finishes`` holds, per machine, the last finish times seen (the caller keeps it from
        one call to the next; at most ``RECENT_FINISHES`` per machine): a run that was already
        queued when one of them freed its machine, and was handed over after, gives a hand-over
        sample.
        """
        learned = 0
        for record in records:
            if record.dispatched_at is None or record.finished_at is None:
                continue
            self.observe(
                record.kind, record.flow_id, dispatched_at=record.dispatched_at,
                finished_at=record.finished_at, started_at=record.started_at,
            )  # fmt: skip
            learned += 1
            if record.machine_id is None:
                continue
            recent = finishes.setdefault(record.machine_id, [])
            last = bisect.bisect_right(recent, record.dispatched_at) - 1
            if last >= 0 and record.queued_at <= recent[last] < record.dispatched_at:
                self.observe_handover(record.dispatched_at - recent[last], record.finished_at)
            bisect.insort(recent, record.finished_at)
            del recent[:-RECENT_FINISHES]
        return learned

    def samples(self, kind: ConnectionKind, now: float) -> float:
        """Effective number of runs of ``kind`` the target has completed lately."""
        stats = self.kinds.get(kind.value)
        return stats.samples(now, self.half_life_s) if stats is not None else 0.0

    def completion_rate(self, kind: ConnectionKind, now: float) -> float:
        """Runs of ``kind`` completed per second lately (the decayed count over its window)."""
        return self.samples(kind, now) * math.log(2) / self.half_life_s

    def estimate(self, kind: ConnectionKind | None, flow_id: str | None, now: float) -> Estimate:
        """The slot time to expect of a run of ``flow_id`` over a ``kind`` connection.

        The finest level with enough history wins: the flow (``FLOW_MIN_SAMPLES``), the kind,
        the whole target, else the prior.
        """
        h = self.half_life_s
        if kind is not None:
            flow = self.flows.get(kind.value, {}).get(flow_id or "") if flow_id else None
            if flow is not None and flow.samples(now, h) >= FLOW_MIN_SAMPLES:
                return Estimate(flow.mean, flow.variance, flow.samples(now, h), "flow", flow)
            stats = self.kinds.get(kind.value)
            if stats is not None and stats.weight > 0:
                return Estimate(stats.mean, stats.variance, stats.samples(now, h), "kind", stats)
        every = DurationStats.merged(self.kinds.values(), h)
        if every.weight > 0:
            return Estimate(every.mean, every.variance, every.samples(now, h), "target", every)
        return Estimate(self.prior_s, self.prior_s**2, 0.0, "prior")

    def start_lag(self, kind: ConnectionKind | None) -> float:
        """Mean time from hand-off to the worker's start (0 without history)."""
        stats = self.lags.get(kind.value) if kind is not None else None
        if stats is None:
            stats = DurationStats.merged(self.lags.values(), self.half_life_s)
        return stats.mean

    def to_dict(self) -> dict[str, Any]:
        """A compact JSON-able form (times rounded to 6 significant digits)."""
        return {
            "v": _FORMAT_VERSION,
            "h": self.half_life_s,
            "p": self.prior_s,
            "k": {kind: stats.to_dict() for kind, stats in self.kinds.items()},
            "f": {
                kind: {flow: stats.to_dict() for flow, stats in flows.items()}
                for kind, flows in self.flows.items()
            },
            "l": {kind: stats.to_dict() for kind, stats in self.lags.items()},
            "o": self.handovers.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> ServiceModel:
        """Read what ``to_dict`` wrote; ``ValueError`` says what is wrong with anything else."""
        if not isinstance(raw, Mapping) or raw.get("v") != _FORMAT_VERSION:
            raise ValueError(f"not a service model of format version {_FORMAT_VERSION}")
        half_life = number(raw.get("h", DEFAULT_HALF_LIFE_S))
        prior = number(raw.get("p", DEFAULT_PRIOR_S))
        if half_life <= 0 or prior < 0:
            raise ValueError("a service model needs a positive half-life and a prior >= 0")
        kinds = _known_kinds(raw.get("k", {}))
        flows = _known_kinds(raw.get("f", {}))
        for flow_map in flows.values():
            if not isinstance(flow_map, Mapping) or len(flow_map) > MAX_FLOWS:
                raise ValueError(f"flows of a kind must be an object of at most {MAX_FLOWS}")
        return cls(
            half_life_s=half_life,
            prior_s=prior,
            kinds={k: DurationStats.from_dict(v) for k, v in kinds.items()},
            flows={
                k: {str(f): DurationStats.from_dict(s) for f, s in v.items()}
                for k, v in flows.items()
            },
            lags={k: DurationStats.from_dict(v) for k, v in _known_kinds(raw.get("l", {})).items()},
            handovers=DurationStats.from_dict(raw.get("o", {})),
        )


def _known_kinds(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError("expected an object keyed by connection kind")
    unknown = set(raw) - {kind.value for kind in ConnectionKind}
    if unknown:
        raise ValueError(f"unknown connection kinds {sorted(unknown)}")
    return dict(raw)
