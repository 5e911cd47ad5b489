"""Decayed statistics of one stream of durations: count, mean, spread and a histogram.

Weights decay with a half-life in wall-clock time, so the effective number of samples says how
much recent history there is. Values also go into a log-spaced histogram (4 buckets per
doubling, 10 ms and below in bucket 0); each bucket keeps its weight and the sum of its values,
so it stands for the exact mean of what fell in it. That gives quantiles and the expected
*remaining* time of a run already some time in: with durations of either 1 s or 60 s, a run 50 s
in has 10 s to go, where "mean - elapsed" says it is overdue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BUCKET_BASE_S = 0.01  # bucket 0 holds [0, 10 ms); bucket b >= 1 holds [base*2^((b-1)/4), ...)
BUCKETS_PER_DOUBLING = 4
# A run already past every recorded duration is assumed to end within this share of its age.
OVERRUN_SHARE = 0.1
PRUNE_BELOW = 1e-6


def _bucket_of(value: float) -> int:
    if value < BUCKET_BASE_S:
        return 0
    return 1 + math.floor(BUCKETS_PER_DOUBLING * math.log2(value / BUCKET_BASE_S))


def _bucket_bounds(index: int) -> tuple[float, float]:
    if index == 0:
        return 0.0, BUCKET_BASE_S
    low = BUCKET_BASE_S * 2 ** ((index - 1) / BUCKETS_PER_DOUBLING)
    return low, low * 2 ** (1 / BUCKETS_PER_DOUBLING)


def decay(seconds: float, half_life_s: float) -> float:
    """The weight left of a sample ``seconds`` old."""
    return math.exp(-seconds * math.log(2) / half_life_s)


def short(value: float) -> float:
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
            weight = decay(self.at - at, half_life_s)
        self.weight += weight
        self.total += weight * value
        self.squares += weight * value * value
        index = _bucket_of(value)
        self.buckets[index] = self.buckets.get(index, 0.0) + weight
        self.sums[index] = self.sums.get(index, 0.0) + weight * value

    def _decay_to(self, at: float, half_life_s: float) -> None:
        if self.weight > 0 and at > self.at:
            factor = decay(at - self.at, half_life_s)
            self.weight *= factor
            self.total *= factor
            self.squares *= factor
            kept = [i for i, w in self.buckets.items() if w * factor > PRUNE_BELOW]
            self.buckets = {i: self.buckets[i] * factor for i in kept}
            self.sums = {i: self.sums.get(i, 0.0) * factor for i in kept}
        self.at = max(self.at, at)

    def samples(self, now: float, half_life_s: float) -> float:
        """The effective number of samples at ``now``."""
        return self.weight * decay(max(0.0, now - self.at), half_life_s)

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
            factor = decay(result.at - part.at, half_life_s)
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
            "t": short(self.at),
            "w": short(self.weight),
            "s": short(self.total),
            "q": short(self.squares),
            "b": {
                str(i): [short(w), short(self.sums.get(i, 0.0))]
                for i, w in sorted(self.buckets.items())
                if w > PRUNE_BELOW
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
            at=number(raw.get("t", 0.0)),
            weight=number(raw.get("w", 0.0)),
            total=number(raw.get("s", 0.0)),
            squares=number(raw.get("q", 0.0)),
            buckets={i: w for i, (w, _) in pairs.items()},
            sums={i: total for i, (_, total) in pairs.items()},
        )
        if stats.weight < 0 or any(w < 0 for w in stats.buckets.values()):
            raise ValueError("duration statistics hold a negative weight")
        return stats


def _pair(value: Any) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ValueError(f"a bucket is [weight, sum], got {value!r}")
    return number(value[0]), number(value[1])


def number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)
