"""The statistics of the bench: intervals of rates and of paired ratios, the noise guard of a
measured window, and pooled latency with misses. Pure (no I/O), standard library only.

* **Rates** (runs/s, msgs/s of repeated drains) vary multiplicatively with the CPU others
  leave us, so they are summarised on the log scale: the geometric mean with a 95 %
  Student-t interval of the mean log (:func:`rate_interval`).
* **Ratios** (ours / baseline) come from *interleaved pairs*: drain i of each side runs back to
  back, so both see about the same machine. Each pair gives one ratio; the estimate is the
  geometric mean of the pair ratios and the 95 % interval the t-interval of their mean log
  (:func:`paired_ratio`), which is exact for log-normal noise and ~right for anything
  symmetric on the log scale. At least ``MIN_PAIRS`` (5) pairs are asked for; fewer are
  reported with ``enough=False``. :func:`bootstrap_ratio` gives a percentile-bootstrap
  interval of the same mean log (seeded, so it is reproducible) as a cross-check that does
  not assume a distribution.
* **Noise guard** (:func:`guarded`): a window during which other processes (not the bench's,
  not RabbitMQ or Redis) used more than 0.3 cores is measured again, at most ``max_repeats``
  times; the repeats are counted and, when none was quiet, the quietest window is kept and
  flagged.
* **Latency** (:class:`LatencyPool`): samples of several windows pooled until they cover at
  least 60 s; a run that never started counts as a miss, i.e. as +inf, so a p99 with more
  than 1 % misses is +inf rather than the p99 of the runs that made it.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

MIN_PAIRS = 5
NOISE_CORES = 0.3
MIN_LATENCY_S = 60.0

# Two-sided 95 % quantiles of Student's t (0.975), degrees of freedom 1..30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    # Beyond 30: the normal quantile with the first terms of the Cornish-Fisher expansion
    # (within 0.001 of the exact value from df 30 on).
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval. ``n`` values (or pairs) went into it."""

    estimate: float
    low: float
    high: float
    n: int
    method: str

    def as_dict(self) -> dict[str, float | int | str | None]:
        """JSON-ready: an interval that cannot be computed (one value) is ``None``."""
        return {
            "estimate": _finite(self.estimate),
            "low": _finite(self.low),
            "high": _finite(self.high),
            "n": self.n,
            "method": self.method,
        }


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def _log_t_interval(logs: Sequence[float], method: str) -> Interval:
    n = len(logs)
    centre = statistics.fmean(logs)
    if n < 2:
        return Interval(math.exp(centre), math.nan, math.nan, n, method)
    half = t975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    return Interval(math.exp(centre), math.exp(centre - half), math.exp(centre + half), n, method)


def rate_interval(rates: Sequence[float]) -> Interval:
    """Geometric mean of positive rates with the 95 % t-interval of the mean log."""
    if not rates or any(r <= 0 for r in rates):
        raise ValueError("rates must be positive and there must be at least one")
    return _log_t_interval([math.log(r) for r in rates], "t on log, geometric mean")


@dataclass(frozen=True)
class PairedRatio:
    interval: Interval
    ratios: tuple[float, ...]
    enough: bool  # at least MIN_PAIRS pairs

    def as_dict(self) -> dict[str, object]:
        return {
            **self.interval.as_dict(),
            "ratios": [round(r, 4) for r in self.ratios],
            "enough_pairs": self.enough,
        }


def _pair_logs(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    if len(numerators) != len(denominators):
        raise ValueError(
            f"paired ratios need as many numerators as denominators "
            f"({len(numerators)} vs {len(denominators)})"
        )
    if not numerators:
        raise ValueError("no pairs")
    if any(v <= 0 for v in (*numerators, *denominators)):
        raise ValueError("paired ratios need positive values")
    return [math.log(a / b) for a, b in zip(numerators, denominators, strict=True)]


def paired_ratio(
    numerators: Sequence[float], denominators: Sequence[float], min_pairs: int = MIN_PAIRS
) -> PairedRatio:
    """Ratio of interleaved pairs (numerators[i] / denominators[i]): geometric mean of the
    pair ratios with the 95 % t-interval of their mean log."""
    logs = _pair_logs(numerators, denominators)
    return PairedRatio(
        _log_t_interval(logs, "paired, t on log ratios"),
        tuple(math.exp(x) for x in logs),
        len(logs) >= min_pairs,
    )


def bootstrap_ratio(
    numerators: Sequence[float],
    denominators: Sequence[float],
    resamples: int = 4000,
    seed: int = 16,
) -> Interval:
    """Percentile-bootstrap 95 % interval of the geometric mean of the pair ratios."""
    logs = _pair_logs(numerators, denominators)
    rng = random.Random(seed)
    n = len(logs)
    means = sorted(statistics.fmean(rng.choices(logs, k=n)) for _ in range(resamples))
    low = means[int(0.025 * (resamples - 1))]
    high = means[math.ceil(0.975 * (resamples - 1))]
    return Interval(
        math.exp(statistics.fmean(logs)), math.exp(low), math.exp(high), n, "paired, bootstrap"
    )


# ---- the noise guard --------------------------------------------------------------------------
T = TypeVar("T")


@dataclass(frozen=True)
class Guarded(Generic[T]):
    """A measured window, after ``repeats`` re-measurements because others were busy."""

    result: T
    others_cores: float
    repeats: int
    quiet: bool  # False: still above the limit after the allowed repeats (kept, flagged)
    discarded_others: tuple[float, ...] = field(default=())


async def guarded(
    measure: Callable[[], Awaitable[T]],
    others_of: Callable[[T], float],
    limit: float = NOISE_CORES,
    max_repeats: int = 3,
) -> Guarded[T]:
    """Measure a window; while other processes used more than ``limit`` cores during it,
    measure it again (at most ``max_repeats`` times). When none was quiet, the quietest is
    kept (flagged ``quiet=False``); ``discarded_others`` are the others' cores of the rest."""
    tried: list[tuple[float, T]] = []
    while True:
        result = await measure()
        others = others_of(result)
        if others <= limit:
            return Guarded(result, others, len(tried), True, tuple(o for o, _ in tried))
        tried.append((others, result))
        if len(tried) > max_repeats:
            best = min(range(len(tried)), key=lambda i: tried[i][0])
            rest = tuple(o for i, (o, _) in enumerate(tried) if i != best)
            return Guarded(tried[best][1], tried[best][0], max_repeats, False, rest)


# ---- latency ---------------------------------------------------------------------------------
@dataclass
class LatencyPool:
    """Latency samples pooled over windows, with the runs that never started as misses."""

    samples: list[float] = field(default_factory=list)
    misses: int = 0
    seconds: float = 0.0
    windows: int = 0

    def add(self, latencies: Sequence[float], missing: int, seconds: float) -> None:
        """One window: the latencies of the runs that started, how many runs sent in it never
        started, and how long it lasted."""
        if missing < 0 or seconds < 0:
            raise ValueError("missing runs and seconds cannot be negative")
        self.samples.extend(latencies)
        self.misses += missing
        self.seconds += seconds
        self.windows += 1

    @property
    def count(self) -> int:
        return len(self.samples) + self.misses

    @property
    def enough(self) -> bool:
        return self.seconds >= MIN_LATENCY_S

    def quantile(self, q: float) -> float:
        """Nearest-rank percentile ``q`` (0..100) of every run sent, a miss being +inf."""
        total = self.count
        if not total:
            return float("nan")
        rank = max(0, min(total - 1, math.ceil(q / 100 * total) - 1))
        ordered = sorted(self.samples)
        return ordered[rank] if rank < len(ordered) else math.inf

    def summary(self) -> dict[str, float | int | bool]:
        return {
            "p50_ms": self.quantile(50),
            "p99_ms": self.quantile(99),
            "samples": len(self.samples),
            "misses": self.misses,
            "seconds": round(self.seconds, 1),
            "windows": self.windows,
            "enough": self.enough,
        }
