"""Intervals of harness.statistics: paired bootstrap, IQM with a stratified bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from harness.statistics import Interval, iqm, iqm_interval, mean_interval, paired_difference


def test_paired_difference_cancels_what_windows_share() -> None:
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0, 10, size=12)  # varies far more than the difference
    a = difficulty + 0.1 + rng.normal(0, 0.01, size=12)
    b = difficulty
    paired = paired_difference(a, b)
    assert paired.n == 12 and paired.estimate == pytest.approx(np.mean(a - b))
    assert 0.09 < paired.low < paired.estimate < paired.high < 0.11
    assert paired.verdict() == "higher" and paired.excludes_zero
    assert paired_difference(b, a).verdict() == "lower"
    # unpaired, the same numbers cannot separate the two
    assert mean_interval(a).low < mean_interval(b).high


def test_interval_containing_zero_is_no_difference() -> None:
    diff = paired_difference([1.0, 2.0, 3.0, 4.0], [1.5, 1.5, 3.5, 3.5])
    assert diff.estimate == 0.0 and diff.low < 0 < diff.high
    assert diff.verdict("better", "worse") == "no difference" and not diff.excludes_zero


def test_mean_interval_covers_the_mean_like_a_t_interval_for_normal_data() -> None:
    values = np.random.default_rng(2).normal(5.0, 1.0, size=40)
    boot = mean_interval(values)
    t = stats.ttest_1samp(values, 0).confidence_interval()
    assert boot.low < values.mean() < boot.high
    assert boot.low == pytest.approx(t.low, abs=0.1) and boot.high == pytest.approx(t.high, abs=0.1)
    assert mean_interval(values) == boot, "seeded: the same interval every time"


def test_degenerate_inputs() -> None:
    one = mean_interval([0.3])
    assert one.estimate == 0.3 and math.isnan(one.low) and one.verdict() == "no difference"
    assert one.format() == "0.3 (n=1)"
    same = paired_difference([1.0, 2.0], [0.5, 1.5])
    assert (same.estimate, same.low, same.high) == (0.5, 0.5, 0.5) and same.verdict() == "higher"
    for bad in ([], [[1.0, 2.0]], [1.0, math.nan], [math.inf, 1.0]):
        with pytest.raises(ValueError, match="values"):
            mean_interval(bad)
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.5)


def test_iqm_is_the_interquartile_mean() -> None:
    assert iqm([1, 2, 3, 4, 5, 6, 7, 100]) == pytest.approx(np.mean([3, 4, 5, 6]))
    assert iqm(np.arange(12).reshape(4, 3)) == pytest.approx(np.mean(np.arange(3, 9)))


def test_iqm_interval_stratifies_over_tasks() -> None:
    rng = np.random.default_rng(3)
    scores = np.stack([rng.normal(0, 0.1, 10), rng.normal(10, 0.1, 10)], axis=1)  # (runs, tasks)
    interval = iqm_interval(scores)
    assert interval.n == 10 and interval.estimate == pytest.approx(iqm(scores))
    # every resample keeps 10 runs of each task, so the IQM stays near the middle (5)
    assert 4 < interval.low <= interval.estimate <= interval.high < 6
    assert math.isnan(iqm_interval(scores[:1]).low)
    with pytest.raises(ValueError, match="runs, tasks"):
        iqm_interval(np.array([[1.0, math.nan]]))


def test_format() -> None:
    assert Interval(0.5, 0.25, 0.75, 8).format() == "0.5 [0.25, 0.75]"
    assert Interval(1e-3, 5e-4, 2e-3, 8).format(scientific=True) == "1.00e-03 [5.00e-04, 2.00e-03]"


def test_interval_columns_of_a_paired_difference():
    from harness.statistics import Interval

    lower = Interval(-2e-3, -3e-3, -1e-3, 8, 0.95).columns("kl_vs_static", scientific=True)
    assert lower == {
        "kl_vs_static": "-2.00e-03 [-3.00e-03, -1.00e-03]",
        "kl_vs_static_mean": -2e-3,
        "kl_vs_static_low": -3e-3,
        "kl_vs_static_high": -1e-3,
        "verdict": "lower KL",
    }
    assert Interval(1.0, -1.0, 2.0, 8, 0.95).columns("d")["verdict"] == "no difference"
    assert Interval(1.0, 0.5, 2.0, 8, 0.95).columns("d")["verdict"] == "higher KL"


def test_grouped_values_are_resampled_together() -> None:
    # Each value twice (two windows sharing one text): treated as independent, the copies
    # narrow the interval; resampled as groups, it is the interval of the distinct values.
    rng = np.random.default_rng(3)
    distinct = rng.normal(0.01, 0.004, size=10)
    doubled = np.repeat(distinct, 2)
    pairs = np.repeat(np.arange(10), 2)
    plain, naive = mean_interval(distinct), mean_interval(doubled)
    grouped = mean_interval(doubled, groups=pairs)
    assert grouped.estimate == pytest.approx(distinct.mean())
    assert grouped.n == 10 and naive.n == 20
    assert grouped.high - grouped.low > 1.2 * (naive.high - naive.low)
    assert grouped.low == pytest.approx(plain.low, rel=0.05)
    assert grouped.high == pytest.approx(plain.high, rel=0.05)
    # labels of any type; the mean is over values, so unequal groups weigh by their size
    labels = ["a", "a", "a", "b", "c"]
    values = [1.0, 1.0, 1.0, 4.0, 7.0]
    assert mean_interval(values, groups=labels).estimate == pytest.approx(14 / 5)
    assert mean_interval(distinct, groups=np.arange(10)[::-1]) == plain  # all distinct
    diff = paired_difference(doubled + 0.002, doubled, groups=pairs)
    assert diff.n == 10 and diff.estimate == pytest.approx(0.002)
    assert diff.low == pytest.approx(0.002) and diff.high == pytest.approx(0.002)


def test_grouped_intervals_refuse_bad_labels_and_need_two_groups() -> None:
    with pytest.raises(ValueError, match="one label per value"):
        mean_interval([1.0, 2.0, 3.0], groups=[0, 1])
    one = mean_interval([1.0, 2.0, 3.0], groups=[5, 5, 5])
    assert one.n == 1 and math.isnan(one.low) and one.estimate == 2.0
