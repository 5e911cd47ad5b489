"""bench/stats.py: intervals, paired ratios, the noise guard and pooled latency."""

from __future__ import annotations

import math
import random

import pytest

from bench.stats import (
    LatencyPool,
    bootstrap_ratio,
    guarded,
    paired_ratio,
    percentile,
    rate_interval,
    t975,
)

pytestmark = pytest.mark.unit


def test_t_quantiles_match_the_table_and_continue_smoothly() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(4) == pytest.approx(2.776)
    assert t975(30) == pytest.approx(2.042)
    assert t975(31) == pytest.approx(2.040, abs=0.002)
    assert t975(120) == pytest.approx(1.980, abs=0.002)
    assert t975(10_000) == pytest.approx(1.960, abs=0.001)
    with pytest.raises(ValueError):
        t975(0)


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_rate_interval_is_the_geometric_mean_with_a_t_interval_on_logs() -> None:
    rates = [100.0, 200.0, 400.0]
    got = rate_interval(rates)
    assert got.estimate == pytest.approx(200.0)
    logs = [math.log(r) for r in rates]
    sd = math.sqrt(sum((x - math.log(200)) ** 2 for x in logs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert got.low == pytest.approx(200 * math.exp(-half))
    assert got.high == pytest.approx(200 * math.exp(half))
    assert got.n == 3


def test_one_rate_has_no_interval_and_says_so_in_json() -> None:
    got = rate_interval([500.0])
    assert got.estimate == pytest.approx(500.0)
    assert got.as_dict()["low"] is None and got.as_dict()["high"] is None


def test_rates_must_be_positive() -> None:
    with pytest.raises(ValueError):
        rate_interval([])
    with pytest.raises(ValueError):
        rate_interval([10.0, 0.0])


def test_identical_pairs_give_a_point_interval() -> None:
    got = paired_ratio([80.0, 90.0, 70.0, 85.0, 75.0], [100.0, 112.5, 87.5, 106.25, 93.75])
    assert got.interval.estimate == pytest.approx(0.8)
    assert got.interval.low == pytest.approx(0.8)
    assert got.interval.high == pytest.approx(0.8)
    assert got.enough


def test_pairing_removes_the_noise_both_sides_share() -> None:
    # The machine moves both sides by up to 2x, the true ratio is 0.75 +/- 2 %.
    rng = random.Random(1)
    machine = [rng.uniform(0.5, 1.0) for _ in range(8)]
    ours = [300 * m * rng.uniform(0.98, 1.02) for m in machine]
    base = [400 * m * rng.uniform(0.98, 1.02) for m in machine]
    paired = paired_ratio(ours, base).interval
    assert paired.low < 0.75 < paired.high
    assert paired.high / paired.low < 1.06
    # Unpaired, the same numbers say much less: the ratio of two wide intervals.
    unpaired = rate_interval(ours).high / rate_interval(base).low
    assert unpaired > paired.high * 1.2


def test_too_few_pairs_are_reported_not_hidden() -> None:
    got = paired_ratio([1.0, 2.0, 3.0], [1.1, 2.1, 3.1])
    assert not got.enough
    assert got.as_dict()["enough_pairs"] is False
    assert len(got.as_dict()["ratios"]) == 3  # type: ignore[arg-type]


def test_pairs_must_match_and_be_positive() -> None:
    with pytest.raises(ValueError, match="as many"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no pairs"):
        paired_ratio([], [])
    with pytest.raises(ValueError, match="positive"):
        paired_ratio([1.0, -2.0], [1.0, 2.0])


def test_bootstrap_agrees_with_the_t_interval_and_is_reproducible() -> None:
    rng = random.Random(7)
    base = [rng.uniform(300, 500) for _ in range(12)]
    ours = [b * 0.7 * math.exp(rng.gauss(0, 0.05)) for b in base]
    t = paired_ratio(ours, base).interval
    boot = bootstrap_ratio(ours, base)
    assert boot == bootstrap_ratio(ours, base)
    assert boot.estimate == pytest.approx(t.estimate)
    assert boot.low == pytest.approx(t.low, rel=0.02)
    assert boot.high == pytest.approx(t.high, rel=0.02)
    assert boot.low < t.estimate < boot.high


async def test_a_noisy_window_is_measured_again_and_counted() -> None:
    others = iter([0.9, 0.5, 0.1, 0.0])
    calls: list[float] = []

    async def measure() -> dict[str, float]:
        value = next(others)
        calls.append(value)
        return {"rate": 100.0, "others_cores": value}

    got = await guarded(measure, lambda r: r["others_cores"])
    assert calls == [0.9, 0.5, 0.1]
    assert got.repeats == 2
    assert got.quiet
    assert got.others_cores == 0.1
    assert got.discarded_others == (0.9, 0.5)


async def test_when_no_window_is_quiet_the_quietest_is_kept_and_flagged() -> None:
    others = iter([0.8, 0.5, 0.9, 0.7])

    async def measure() -> float:
        return next(others)

    got = await guarded(measure, lambda r: r, limit=0.3, max_repeats=3)
    assert got.result == 0.5
    assert got.repeats == 3
    assert not got.quiet
    assert sorted(got.discarded_others) == [0.7, 0.8, 0.9]


async def test_a_quiet_window_is_measured_once() -> None:
    async def measure() -> float:
        return 0.3  # at the limit is quiet enough

    got = await guarded(measure, lambda r: r)
    assert got.repeats == 0 and got.quiet


def test_latency_pools_windows_and_counts_misses_as_infinite() -> None:
    pool = LatencyPool()
    pool.add([10.0] * 500, missing=0, seconds=30.0)
    assert not pool.enough
    pool.add([20.0] * 490, missing=10, seconds=30.0)
    assert pool.enough
    assert pool.count == 1000
    assert pool.quantile(50) == 10.0
    # 10 misses of 1000 are 1 %: the p99 rank lands on the last real sample ...
    assert pool.quantile(99) == 20.0
    # ... and one more miss puts it among the misses.
    pool.add([], missing=1, seconds=0.5)
    assert pool.quantile(99) == math.inf
    summary = pool.summary()
    assert summary["misses"] == 11 and summary["windows"] == 3 and summary["enough"] is True


def test_dropping_misses_would_have_hidden_them() -> None:
    pool = LatencyPool()
    pool.add([5.0] * 97, missing=3, seconds=60.0)
    assert percentile(pool.samples, 99) == 5.0
    assert pool.quantile(99) == math.inf


def test_latency_rejects_negative_input() -> None:
    with pytest.raises(ValueError):
        LatencyPool().add([1.0], missing=-1, seconds=1.0)
    assert math.isnan(LatencyPool().quantile(50))
