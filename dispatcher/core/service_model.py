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

Slot times also go into a log-spaced histogram (4 buckets per doubling), which gives
quantiles (the optimistic estimate fail-early needs) and the expected *remaining* time of a run
that has been running a while: with a flow that takes either 1 s or 60 s, the mean says a run 50 s
in ends now; the histogram says in about 10 s.

The model is a plain value: ``observe`` updates it, ``to_dict``/``from_dict`` give a compact
JSON-able form (bounded: at most ``MAX_FLOWS`` flows per kind, empty buckets pruned).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.models import ConnectionKind

DEFAULT_HALF_LIFE_S = 3 * 3600.0
# What a slot time is assumed to be before a target has any history (confidence is then low).
DEFAULT_PRIOR_S = 60.0
# A flow's own statistics replace its kind's once they hold this many (decayed) samples: three
# recent runs (decay makes three samples a little less than 3).
FLOW_MIN_SAMPLES = 2.5
MAX_FLOWS = 64
BUCKET_BASE_S = 0.01  # bucket 0 holds [0, 10 ms); bucket b >= 1 holds [base*2^((b-1)/4), ...)
BUCKETS_PER_DOUBLING = 4
# A run already past every recorded slot time is assumed to end within this share of its age.
OVERRUN_SHARE = 0.1
_PRUNE_BELOW = 1e-6
_FORMAT_VERSION = 1


def _bucket_of(value: float) -> int:
    if value < BUCKET_BASE_S:
        return 0
    return 1 + math.floor(BUCKETS_PER_DOUBLING * math.log2(value / BUCKET_BASE_S))


def _bucket_bounds(index: int) -> tuple[float, float]:
    if index == 0:
        return 0.0, BUCKET_BASE_S
    low = BUCKET_BASE_S * 2 ** ((index - 1) / BUCKETS_PER_DOUBLING)
    return low, low * 2 ** (1 / BUCKETS_PER_DOUBLING)


def _decay(seconds: float, half_life_s: float) -> float:
    """The weight left of a sample ``seconds`` old."""
    return math.exp(-seconds * math.log(2) / half_life_s)


def _short(value: float) -> float:
    """Six significant digits are plenty for a statistic and keep the stored form small."""
    return float(f"{value:.6g}")


@dataclass
class DurationStats:
    """Decayed count, sum, sum of squares and histogram of one stream of durations.

    The sums are decayed to ``at``; reading them later applies the decay since then, which
    changes the weight (the effective number of samples) but not means or quantiles. Each
    bucket keeps its weight and the sum of its values, so a bucket stands for its exact mean:
    a flow that always takes 2.0 s has its quantiles and remaining times at 2.0 s, not at the
    middle of a 19 % wide bucket.
    """

    at: float = 0.0
    weight: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    buckets: dict[int, float] = field(default_factory=dict)
    sums: dict[int, float] = field(default_factory=dict)

    def add(self, value: float, at: float, half_life_s: float) -> None:
        value = max(0.0, value)
        if at >= self.at:
            self._decay_to(at, half_life_s)
            weight = 1.0
        else:  # a late report (another replica): it counts as old as it is
            weight = _decay(self.at - at, half_life_s)
        self.weight += weight
        self.total += weight * value
        self.squares += weight * value * value
        index = _bucket_of(value)
        self.buckets[index] = self.buckets.get(index, 0.0) + weight
        self.sums[index] = self.sums.get(index, 0.0) + weight * value

    def _decay_to(self, at: float, half_life_s: float) -> None:
        if self.weight > 0 and at > self.at:
            factor = _decay(at - self.at, half_life_s)
            self.weight *= factor
            self.total *= factor
            self.squares *= factor
            kept = [i for i, w in self.buckets.items() if w * factor > _PRUNE_BELOW]
            self.buckets = {i: self.buckets[i] * factor for i in kept}
            self.sums = {i: self.sums.get(i, 0.0) * factor for i in kept}
        self.at = max(self.at, at)

    def samples(self, now: float, half_life_s: float) -> float:
        """The effective number of samples at ``now``."""
        return self.weight * _decay(max(0.0, now - self.at), half_life_s)

    @property
    def mean(self) -> float:
        return self.total / self.weight if self.weight > 0 else 0.0

    @property
    def variance(self) -> float:
        if self.weight <= 0:
            return 0.0
        return max(0.0, self.squares / self.weight - self.mean**2)

    def quantile(self, p: float, above: float = 0.0) -> float:
        """The ``p`` quantile of the durations longer than ``above``, minus ``above``.

        With ``above=0`` this is the plain quantile; with a run's age it is how much longer
        the run lasts in the ``p`` case.
        """
        points = self._above(above)
        mass = sum(w for _, w in points)
        if mass <= 0:
            return OVERRUN_SHARE * above
        goal = min(max(p, 0.0), 1.0) * mass
        seen = 0.0
        for value, weight in points:
            seen += weight
            if seen >= goal * (1 - 1e-12):
                return value - above
        return points[-1][0] - above

    def remaining(self, elapsed: float) -> tuple[float, float]:
        """Mean and variance of how much longer a run lasts that has run ``elapsed`` seconds."""
        if elapsed <= 0:
            return self.mean, self.variance
        points = self._above(elapsed)
        mass = sum(w for _, w in points)
        if mass <= 0:
            guess = OVERRUN_SHARE * elapsed
            return guess, guess * guess
        first = sum(w * (value - elapsed) for value, w in points) / mass
        second = sum(w * (value - elapsed) ** 2 for value, w in points) / mass
        return first, max(0.0, second - first * first)

    def _above(self, threshold: float) -> list[tuple[float, float]]:
        """The buckets whose mean is above ``threshold``: (mean, weight), shortest first."""
        points: list[tuple[float, float]] = []
        for index in sorted(self.buckets):
            weight = self.buckets[index]
            if weight <= 0:
                continue
            value = self.sums.get(index, 0.0) / weight
            if value > threshold:
                points.append((value, weight))
        return points

    @classmethod
    def merged(cls, parts: Iterable[DurationStats], half_life_s: float) -> DurationStats:
        """One stream made of several (e.g. every kind of a target)."""
        result = cls()
        items = [p for p in parts if p.weight > 0]
        if not items:
            return result
        result.at = max(p.at for p in items)
        for part in items:
            factor = _decay(result.at - part.at, half_life_s)
            result.weight += part.weight * factor
            result.total += part.total * factor
            result.squares += part.squares * factor
            for index, weight in part.buckets.items():
                result.buckets[index] = result.buckets.get(index, 0.0) + weight * factor
                result.sums[index] = (
                    result.sums.get(index, 0.0) + part.sums.get(index, 0.0) * factor
                )
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "t": _short(self.at),
            "w": _short(self.weight),
            "s": _short(self.total),
            "q": _short(self.squares),
            "b": {
                str(i): [_short(w), _short(self.sums.get(i, 0.0))]
                for i, w in sorted(self.buckets.items())
                if w > _PRUNE_BELOW
            },
        }

    @classmethod
    def from_dict(cls, raw: Any) -> DurationStats:
        if not isinstance(raw, Mapping):
            raise ValueError("duration statistics must be an object")
        buckets = raw.get("b", {})
        if not isinstance(buckets, Mapping):
            raise ValueError("duration buckets must be an object")
        pairs = {int(i): _pair(pair) for i, pair in buckets.items()}
        stats = cls(
            at=_number(raw.get("t", 0.0)),
            weight=_number(raw.get("w", 0.0)),
            total=_number(raw.get("s", 0.0)),
            squares=_number(raw.get("q", 0.0)),
            buckets={i: w for i, (w, _) in pairs.items()},
            sums={i: total for i, (_, total) in pairs.items()},
        )
        if stats.weight < 0 or any(w < 0 for w in stats.buckets.values()):
            raise ValueError("duration statistics hold a negative weight")
        return stats


def _pair(value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"a bucket is [weight, sum], got {value!r}")
    return _number(value[0]), _number(value[1])


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


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
        """Mean time from a slot freeing to the next run on it (0 without history)."""
        return self.handovers.mean

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
        half_life = _number(raw.get("h", DEFAULT_HALF_LIFE_S))
        prior = _number(raw.get("p", DEFAULT_PRIOR_S))
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
