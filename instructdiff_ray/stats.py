"""Intervals for `compare`: a t interval of a mean over seeds, and a paired bootstrap interval of
the difference between two strategies over held-out rows and seeds. A leaf (numpy only)."""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 4000  # resamples: the interval's ends move by well under 1% of its width between seeds
# Student's t, two-sided 95%, by degrees of freedom (1..30); beyond, the normal 1.96 is within 2%.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.96


def mean_interval(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): the 95% t interval of the mean of independent runs (seeds); no interval
    from a single run."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return None, None, None
    if len(x) == 1:
        return float(x[0]), None, None
    half = t95(len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def paired_bootstrap(diff: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the mean paired difference `diff[seed, row]` (a strategy's held-out NLL
    minus the reference's, same row and training seed), with a percentile bootstrap interval that
    resamples seeds and rows together, so both sources of variation are in it. NaN (a row that
    failed in either model) is left out of its seed's mean."""
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    rng = np.random.default_rng(seed)
    s, n = d.shape
    means = np.empty(resamples)
    for b in range(resamples):
        pick = d[rng.integers(0, s, s)][:, rng.integers(0, n, n)]
        means[b] = np.nanmean(pick)
    lo, hi = np.nanquantile(means, [(1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2])
    return float(np.nanmean(d)), float(lo), float(hi)


def excludes_zero(low: float | None, high: float | None) -> bool:
    """Whether an interval tells the difference apart from zero."""
    return low is not None and high is not None and (low > 0 or high < 0)
