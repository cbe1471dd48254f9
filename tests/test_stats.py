"""common/stats.py against cases computed by hand (and scipy's permutation test as a cross-check)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from common.stats import (compare_paired, holm, mean_interval, paired_differences, prediction_interval,
                          sign_flip_p)


def test_sign_flip_p_by_hand():
    # ±1 ±2 ±3 takes the values ±6, ±4, ±2, 0, 0: two of eight patterns reach |6|
    assert sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)
    # observed sum 0: every pattern is at least as extreme
    assert sign_flip_p([1, 2, -3]) == 1.0
    # 3 ±1 ±1 ±1 = 6, 4, 4, 4, 2, 2, 2, 0 and the mirror: |sum| ≥ 4 in 8 of 16
    assert sign_flip_p([3, 1, 1, -1]) == pytest.approx(8 / 16)
    assert sign_flip_p([3, 1, 1, 1]) == pytest.approx(2 / 16)


def test_five_seeds_cannot_reach_005():
    # the most extreme case possible with five pairs: all positive
    assert sign_flip_p([0.5, 1.0, 1.5, 2.0, 2.5]) == pytest.approx(0.0625)
    for signs in np.random.default_rng(0).choice((-1, 1), size=(20, 5)):
        assert sign_flip_p(signs * np.arange(1, 6)) >= 0.0625
    assert sign_flip_p(np.arange(1, 11)) == pytest.approx(2 / 1024)


def test_zeros_count_as_if_dropped_and_ties_need_no_rule():
    assert sign_flip_p([0, 1, 2, 3]) == pytest.approx(sign_flip_p([1, 2, 3]))
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert sign_flip_p([2, 2, 2]) == pytest.approx(2 / 8)     # equal |d|: the sum has no ties problem
    # rounding: 0.1 + 0.2 vs 0.3 sums that are equal on paper count as equally extreme
    assert sign_flip_p([0.1, 0.2, -0.3, 0.3]) == sign_flip_p([1, 2, -3, 3])


def test_sign_flip_matches_scipy_exact_permutation_test():
    d = np.random.default_rng(1).normal(0.4, 1.0, 11)
    ref = scipy_stats.permutation_test((d,), lambda x, axis: np.abs(np.sum(x, axis=axis)), permutation_type="samples",
                                       n_resamples=10 ** 6, alternative="greater")
    assert sign_flip_p(d) == pytest.approx(ref.pvalue)


def test_sign_flip_above_exact_limit_is_a_seeded_estimate():
    d = np.random.default_rng(2).normal(0.2, 1.0, 14)
    exact = sign_flip_p(d)
    estimate = sign_flip_p(d, max_exact=10, random_patterns=50_000)
    assert estimate == sign_flip_p(d, max_exact=10, random_patterns=50_000)   # reproducible
    assert abs(estimate - exact) < 0.01 and estimate > 0


def test_mean_interval_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / √3 = 2.484138
    mean, low, high = mean_interval([1, 2, 3])
    assert mean == 2 and low == pytest.approx(2 - 2.484138, abs=1e-6) and high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert mean_interval([0, 0, 0]) == (0, 0, 0)
    assert mean_interval([1.5, 1.5]) == (1.5, 1.5, 1.5)
    mean, low, high = mean_interval([4.0])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)


def test_prediction_interval_by_hand():
    # d = 1, 2, 3: half width 4.302653 · 1 · √(4/3) = 4.968275
    low, high = prediction_interval([1, 2, 3])
    assert low == pytest.approx(2 - 4.968275, abs=1e-6) and high == pytest.approx(2 + 4.968275, abs=1e-6)
    assert all(math.isnan(v) for v in prediction_interval([1.0]))
    # wider than the interval of the mean by √(n + 1)
    _, mlow, mhigh = mean_interval(np.arange(10.0))
    plow, phigh = prediction_interval(np.arange(10.0))
    assert (phigh - plow) / (mhigh - mlow) == pytest.approx(math.sqrt(11))


def test_bad_differences_are_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        sign_flip_p([1.0, math.nan])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, math.nan, 2.0])
    with pytest.raises(ValueError, match="no paired differences"):
        mean_interval([])


def test_paired_differences_keeps_only_complete_pairs():
    a = pd.Series({42: 1.0, 43: 2.0, 44: math.nan, 45: 4.0})
    b = pd.Series({43: 3.0, 42: 1.5, 44: 9.0, 46: 1.0})
    d = paired_differences(a, b)
    assert d.index.tolist() == [42, 43] and d.tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="more than one value"):
        paired_differences(pd.Series([1.0, 2.0], index=[42, 42]), b)
    assert paired_differences(a, pd.Series({50: 1.0})).empty


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005, 3·0.01, 2·0.03, max(0.06, 1·0.04)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.01, math.nan, 0.02])              # NaN: not part of the family of two
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert holm([]).size == 0
    with pytest.raises(ValueError):
        holm([1.5])


def test_compare_paired_one_pair_and_constant_pairs():
    one = compare_paired(pd.Series({42: 0.7}))
    assert one.n == 1 and one.mean == 0.7 and one.p == 1.0 and math.isnan(one.low) and math.isnan(one.sd)
    constant = compare_paired(pd.Series({s: 0.25 for s in range(42, 52)}))
    assert (constant.low, constant.high) == (0.25, 0.25) and constant.p == pytest.approx(2 / 1024)
    assert constant.seeds == tuple(range(42, 52))
