"""Paired statistics over seeds: does arm B differ from arm A, and is a published number a plausible run?

A *paired difference* is ``B − A`` for one seed, where A and B are two cycles of the same run
(cycle 0 vs cycle 3) or two arms started from the same seed (sharpened vs random targets at k = 1).
Pairing removes the seed-to-seed spread that both arms share, which is most of it.

- :func:`paired_differences`: ``B − A`` per seed over the seeds both arms have. A seed missing from
  either arm, or with a NaN value in either, forms no pair and is left out (the result says which).
- :func:`mean_interval`: the mean difference with its Student-t interval, ``mean ± t(n−1) · sd / √n``.
- :func:`prediction_interval`: where *one new run's* difference would fall,
  ``mean ± t(n−1) · sd · √(1 + 1/n)``. The paper reports one run (one seed, λ picked per cycle):
  that single number is a plausible draw of ours if it lies inside this interval, even where it lies
  outside the interval of the mean.
- :func:`sign_flip_p`: the exact two-sided sign-flip (paired permutation) test of "the differences
  are symmetric around 0". Under that null every one of the 2ⁿ sign patterns of the differences is
  equally likely; p is the share of patterns whose |sum| is at least the observed |sum|. The
  observed pattern and its mirror image always count, so ``p ≥ 2 / 2ⁿ``: 0.0625 for n = 5, 0.00195
  for n = 10 — five seeds can never reach p < 0.05. Ties and zeros: a zero difference has the same
  value under both signs, so it doubles the count of extreme and of all patterns alike and leaves p
  as if it were dropped (but it still counts in n for the mean and the intervals); equal |d| need
  no rule, since the statistic is the sum. Sums equal to the observed one up to floating-point
  rounding (relative 1e-9) count as extreme, so p is never too small by rounding. For n ≤ 20 every
  pattern is enumerated; above, ``max_exact`` is exceeded and p is estimated from random patterns
  (fixed seed) as ``(1 + extreme) / (1 + draws)``, a valid p-value (under the null it falls below
  α no more often than α).
- :func:`holm`: Holm's step-down adjustment of a family of p-values (controls the chance of any
  false "significant" in the family at α, with no assumption about how the tests depend on each
  other). NaN p-values (claims without data) are not part of the family and stay NaN.

Edge cases, all documented results rather than errors unless stated: no pair at all raises
``ValueError``; a NaN inside the differences given to the functions below raises ``ValueError``
(drop the pair first: :func:`paired_differences` does); one pair gives a mean, NaN intervals (no
spread can be estimated) and p = 1; all differences zero give mean 0, the interval [0, 0] and p = 1;
all differences equal to the same non-zero c give the interval [c, c] and p = 2 / 2ⁿ.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

LEVEL = 0.95
MAX_EXACT = 20                 # 2^20 ≈ 1e6 sign patterns: well under a second
RANDOM_PATTERNS = 200_000      # sign patterns drawn when n > MAX_EXACT
RELATIVE_TIE = 1e-9            # |sum| within this (relative) of the observed counts as extreme


def _clean(differences: Sequence[float] | np.ndarray) -> np.ndarray:
    d = np.asarray(differences, dtype=float).ravel()
    if d.size == 0:
        raise ValueError("no paired differences: neither arm has a seed that the other has")
    if np.isnan(d).any():
        raise ValueError("paired differences contain NaN; leave that seed's pair out (paired_differences does)")
    if np.isinf(d).any():
        raise ValueError("paired differences contain an infinite value")
    return d


def paired_differences(baseline: Mapping[int, float] | pd.Series, treatment: Mapping[int, float] | pd.Series) -> pd.Series:
    """``treatment − baseline`` per seed (index: seed, sorted) over the seeds with a finite value in both."""
    a = pd.to_numeric(pd.Series(baseline, dtype=float), errors="coerce")
    b = pd.to_numeric(pd.Series(treatment, dtype=float), errors="coerce")
    for name, arm in (("baseline", a), ("treatment", b)):
        if arm.index.has_duplicates:
            raise ValueError(f"the {name} arm has more than one value for seed(s) "
                             f"{sorted(set(arm.index[arm.index.duplicated()]))}")
    seeds = a.index.intersection(b.index)
    diff = (b[seeds] - a[seeds]).replace([np.inf, -np.inf], np.nan).dropna()
    return diff.sort_index().rename("difference")


def mean_interval(differences, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval of the mean difference; NaN bounds for one pair."""
    d = _clean(differences)
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + level / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def prediction_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) for one new draw from the distribution these values came from (normal, unknown
    mean and sd): ``mean ± t(n−1) · sd · √(1 + 1/n)``; NaN bounds for one value."""
    v = _clean(values)
    if v.size < 2:
        return math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + level / 2, v.size - 1)) * float(v.std(ddof=1)) * math.sqrt(1 + 1 / v.size)
    mean = float(v.mean())
    return mean - half, mean + half


def sign_flip_p(differences, *, max_exact: int = MAX_EXACT, random_patterns: int = RANDOM_PATTERNS,
                seed: int = 0) -> float:
    """Two-sided sign-flip p-value of the mean difference (exact for n ≤ max_exact; module docstring)."""
    d = _clean(differences)
    observed = abs(float(d.sum()))
    tolerance = RELATIVE_TIE * max(float(np.abs(d).sum()), np.finfo(float).tiny)
    if d.size <= max_exact:
        extreme, total = 0, 0
        chunk_bits = min(d.size, 16)            # patterns are enumerated 2^16 at a time
        low = np.arange(2 ** chunk_bits)[:, None]
        low_signs = 1.0 - 2.0 * ((low >> np.arange(chunk_bits)) & 1)        # (2^chunk, chunk)
        low_sums = low_signs @ d[:chunk_bits]
        high_bits = d.size - chunk_bits
        for high in range(2 ** high_bits):
            high_signs = 1.0 - 2.0 * ((high >> np.arange(high_bits)) & 1)
            sums = low_sums + float(high_signs @ d[chunk_bits:])
            extreme += int(np.count_nonzero(np.abs(sums) >= observed - tolerance))
            total += sums.size
        return extreme / total
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, random_patterns, 10_000):
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, random_patterns - start), d.size))
        extreme += int(np.count_nonzero(np.abs(signs @ d) >= observed - tolerance))
    return (1 + extreme) / (1 + random_patterns)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values, in the input order; NaN entries are outside the family and stay NaN.

    Sorted ascending, the i-th smallest of m becomes ``max_{j ≤ i} min(1, (m − j + 1) · p_(j))``;
    a claim is significant at family-wise level α when its adjusted p is below α.
    """
    p = np.asarray(p_values, dtype=float)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    adjusted = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    order = present[np.argsort(p[present], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


@dataclass(frozen=True)
class PairedComparison:
    """Everything the claims table reports about one paired comparison."""
    n: int
    mean: float
    sd: float
    low: float                 # interval of the mean (LEVEL)
    high: float
    p: float                   # exact two-sided sign-flip p
    predict_low: float         # where one new run's difference would fall (LEVEL)
    predict_high: float
    seeds: tuple[int, ...]


def compare_paired(differences: pd.Series, level: float = LEVEL) -> PairedComparison:
    """Summary of ``paired_differences(...)`` (a Series indexed by seed)."""
    d = _clean(differences.to_numpy())
    mean, low, high = mean_interval(d, level)
    predict_low, predict_high = prediction_interval(d, level)
    return PairedComparison(n=int(d.size), mean=mean, sd=float(d.std(ddof=1)) if d.size > 1 else math.nan,
                            low=low, high=high, p=sign_flip_p(d), predict_low=predict_low,
                            predict_high=predict_high, seeds=tuple(int(s) for s in differences.index))
