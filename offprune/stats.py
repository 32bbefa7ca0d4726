"""Aggregate statistics for reports: IQM and percentile-bootstrap confidence intervals.

Follows rliable (Agarwal et al. 2021) without depending on it: the interquartile mean is the mean
of the middle 50 % of values (scipy.stats.trim_mean(x, 0.25): int(0.25 n) values cut from each
end); confidence intervals are percentile bootstraps over runs, and when several tasks (datasets)
are aggregated the runs are resampled within each task (stratified), as rliable does.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_REPS = 2000  # bootstrap resamples
CONFIDENCE = 0.95


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: sort, drop int(n/4) values at each end, average the rest."""
    x = np.sort(np.asarray(values, dtype=float).ravel())
    cut = int(0.25 * len(x))
    return float(x[cut:len(x) - cut].mean())


def ratio_of_means(groups: Sequence[Sequence[float]]) -> float:
    """mean(groups[0]) / mean(groups[1]): a score relative to a baseline (a bootstrap statistic)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(groups[0]) / np.mean(groups[1]))


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    reps: int = DEFAULT_REPS,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic` over resamples (with replacement) of `values`."""
    return stratified_bootstrap_ci([values], lambda groups: statistic(groups[0]), reps, confidence, seed)


def stratified_bootstrap_ci(
    groups: Sequence[Sequence[float]],
    statistic: Callable[[list[np.ndarray]], float],
    reps: int = DEFAULT_REPS,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(list of groups)`, each group resampled on its
    own (tasks keep their number of runs; a two-group ratio resamples numerator and denominator
    runs independently). Each group is sorted first, so the interval depends on the values only,
    not on the order results were written in (a study's runs finish in any order)."""
    rng = np.random.default_rng(seed)
    arrays = [np.sort(np.asarray(g, dtype=float).ravel()) for g in groups]
    if any(len(a) == 0 for a in arrays):
        raise ValueError("every group needs at least one value")
    stats = np.empty(reps)
    for i in range(reps):
        stats[i] = statistic([a[rng.integers(0, len(a), len(a))] for a in arrays])
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)
