"""Intervals for comparing policies: paired bootstrap over windows, IQM over seeds.

Tables that compare two policies on the same windows report the mean paired difference with
a 95 % bootstrap interval (:func:`paired_difference`, through ``scipy.stats.bootstrap``); a
difference whose interval contains 0 is reported as "no difference" (:meth:`Interval.verdict`),
never as a ranking. Scores over seeds and tasks are aggregated with the interquartile mean
and a stratified bootstrap over runs (:func:`iqm_interval`), the estimator and interval of
Agarwal et al. (2021), "Deep RL at the Edge of the Statistical Precipice" (``rliable``).
``rliable`` itself is not a dependency: its 1.2 release requires ``arch < 8``, and those
``arch`` releases do not import beside pandas 3.

Example:
    >>> from harness.statistics import paired_difference
    >>> paired_difference([0.010, 0.020, 0.015, 0.012], [0.012, 0.018, 0.016, 0.011]).verdict()
    'no difference'

Bootstrap intervals over a handful of windows are too narrow (with 3 windows there are 10
distinct resamples): read intervals over fewer than about 8 windows as rough.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval.

    Attributes:
        estimate: The statistic on the data (a mean, a mean difference, an IQM).
        low, high: The interval's bounds (NaN when ``n`` < 2: no interval exists).
        n: Paired samples (windows) or runs the interval rests on.
        confidence: Its confidence level.
    """

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def excludes_zero(self) -> bool:
        """Whether the whole interval lies on one side of 0 (False without an interval)."""
        return bool(self.low > 0 or self.high < 0)

    def verdict(self, lower: str = "lower", higher: str = "higher") -> str:
        """``lower``/``higher`` when the interval excludes 0, else ``"no difference"``."""
        if not self.excludes_zero:
            return "no difference"
        return lower if self.high < 0 else higher

    def columns(self, prefix: str, scientific: bool = False) -> dict[str, object]:
        """Table columns of a paired difference: ``prefix`` (formatted), ``prefix_mean``,
        ``prefix_low``, ``prefix_high`` and ``verdict`` (``lower KL``/``higher KL``/``no
        difference`` for a KL difference; see :meth:`verdict`)."""
        return {
            prefix: self.format(scientific=scientific),
            f"{prefix}_mean": self.estimate,
            f"{prefix}_low": self.low,
            f"{prefix}_high": self.high,
            "verdict": self.verdict("lower KL", "higher KL"),
        }

    def format(self, digits: int = 3, scientific: bool = False) -> str:
        """``estimate [low, high]`` (``estimate (n=1)`` without an interval)."""
        spec = f".{digits - 1}e" if scientific else f".{digits}g"
        if math.isnan(self.low):
            return f"{self.estimate:{spec}} (n={self.n})"
        return f"{self.estimate:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values: {array.tolist()}")
    return array


def mean_interval(
    values: Sequence[float],
    confidence: float = CONFIDENCE,
    n_resamples: int = RESAMPLES,
    seed: int = SEED,
    groups: Sequence[object] | None = None,
) -> Interval:
    """The mean of ``values`` with a bootstrap interval (BCa; percentile where BCa is undefined).

    Fewer than 2 values have no interval (NaN bounds); identical values give the
    degenerate interval [mean, mean].

    ``groups`` gives each value a label: values with one label are not independent (windows
    that share their text) and are resampled together. This is a cluster bootstrap: each
    resample draws whole groups and takes the mean over every value drawn. The interval
    then rests on the number of groups (``n``; fewer than 2 groups have no interval). Labels
    that are all distinct give the plain bootstrap's interval.

    Raises:
        ValueError: If ``values`` is empty, not 1-D, or not finite, ``groups`` does not give
            one label per value, or ``confidence`` is not in (0, 1).
    """
    array = _values(values, "values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    mean = float(array.mean())
    labels = None if groups is None else np.asarray(groups)
    if labels is not None and labels.shape != array.shape:
        raise ValueError(f"groups must give one label per value: {labels.shape} labels")
    _, index = (None, None) if labels is None else np.unique(labels, return_inverse=True)
    if index is None or index.max() + 1 == array.size:  # every value its own group
        samples, statistic = (array,), np.mean
    else:
        sums = np.bincount(index, weights=array)
        counts = np.bincount(index).astype(np.float64)
        samples, statistic = (sums, counts), _pooled_mean
    size = samples[0].size
    if size < 2:
        return Interval(mean, math.nan, math.nan, size, confidence)
    if np.all(array == array[0]):
        return Interval(mean, mean, mean, size, confidence)
    low, high = math.nan, math.nan
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's degenerate-sample warning: fall back
            result = stats.bootstrap(
                samples,
                statistic,
                paired=len(samples) > 1,
                vectorized=True,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method=method,
                rng=np.random.default_rng(seed),
            )
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            break
    return Interval(mean, float(low), float(high), size, confidence)


def _pooled_mean(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over every value of the drawn groups: their summed values over their sizes."""
    return sums.sum(axis=axis) / counts.sum(axis=axis)


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = CONFIDENCE,
    n_resamples: int = RESAMPLES,
    seed: int = SEED,
    groups: Sequence[object] | None = None,
) -> Interval:
    """Mean of ``a - b`` over paired samples (the same windows) with a bootstrap interval.

    Windows are resampled together, so what the two policies share (a window's difficulty)
    cancels: the interval is that of the mean paired difference. ``groups``: as for
    :func:`mean_interval` (windows that share their text are resampled together).

    Raises:
        ValueError: If the sequences differ in length or are empty or not finite.
    """
    first, second = _values(a, "a"), _values(b, "b")
    if first.shape != second.shape:
        raise ValueError(f"paired samples differ in length: {first.size} and {second.size}")
    return mean_interval(first - second, confidence, n_resamples, seed, groups)


def window_labels(groups: np.ndarray | None, windows: Sequence[int]) -> np.ndarray | None:
    """The labels of ``windows`` in ``groups`` (one label per window index, as
    :meth:`drrl_env.data.sources.Source.text_groups` gives them), for the ``groups`` argument
    of :func:`mean_interval` and :func:`paired_difference`; None when ``groups`` is None
    (every window apart).

    Raises:
        ValueError: A window outside ``groups``.
    """
    if groups is None:
        return None
    index = np.asarray(windows, dtype=np.int64)
    labels = np.asarray(groups)
    if index.size and (index.min() < 0 or index.max() >= labels.size):
        raise ValueError(f"windows {index.tolist()} are not all among the {labels.size} labelled")
    return labels[index]


def iqm(values: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50 % (``scipy.stats.trim_mean(x, 0.25)``)."""
    return float(stats.trim_mean(np.asarray(values, dtype=np.float64).ravel(), 0.25))


def iqm_interval(
    scores: np.ndarray,
    confidence: float = CONFIDENCE,
    n_resamples: int = 2_000,
    seed: int = SEED,
) -> Interval:
    """IQM of a (runs, tasks) score matrix with a stratified bootstrap interval.

    Each resample draws, for every task (column) separately, as many runs as there are with
    replacement, and takes the IQM of all the drawn scores (rliable's
    ``get_interval_estimates`` with ``StratifiedBootstrap``); the interval is the resamples'
    percentile interval. One run has no interval.

    Raises:
        ValueError: If ``scores`` is not a non-empty 2-D finite array.
    """
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.size == 0 or not np.all(np.isfinite(matrix)):
        raise ValueError(f"scores must be a finite (runs, tasks) array, got shape {matrix.shape}")
    runs, tasks = matrix.shape
    estimate = iqm(matrix)
    if runs < 2:
        return Interval(estimate, math.nan, math.nan, runs, confidence)
    rng = np.random.default_rng(seed)
    draws = rng.integers(runs, size=(n_resamples, runs, tasks))
    resampled = np.take_along_axis(matrix[None], draws, axis=1).reshape(n_resamples, -1)
    values = stats.trim_mean(resampled, 0.25, axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return Interval(estimate, float(low), float(high), runs, confidence)
