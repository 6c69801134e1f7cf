"""Permutation engine: exact subset sampling, p-value form, agreement with scipy, calibration
(false-positive rate) and power."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aad_med.distances import aad_permutation_test
from aad_med.distances.permutation import (
    MeanDifferenceStatistic,
    observed_indicator,
    permutation_pvalue,
    subset_indicators,
)


def test_subset_indicators_select_exactly_n_a_uniformly():
    rng = np.random.default_rng(0)
    cols = np.hstack([c.copy() for c in subset_indicators(7, 3, 30_000, rng, chunk=4096)])
    assert cols.shape == (7, 30_000)
    assert set(np.unique(cols)) == {0.0, 1.0}
    assert np.all(cols.sum(axis=0) == 3)
    # each subject is in group A with probability 3/7; the 35 subsets are equally likely
    assert cols.mean(axis=1) == pytest.approx(np.full(7, 3 / 7), abs=0.012)
    codes = (cols.T.astype(int) * (1 << np.arange(7))).sum(axis=1)
    counts = np.bincount(codes, minlength=128)[np.bincount(codes, minlength=128) > 0]
    assert counts.size == 35
    assert stats.chisquare(counts).pvalue > 0.001


def test_mean_statistic_matches_direct_mean_difference():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(9, 4)) + 100.0  # offset: centring must keep float32 accurate
    ind = next(subset_indicators(9, 4, 50, rng))
    got = MeanDifferenceStatistic(z, 4)(ind)[0]
    want = [
        np.sum((z[c == 1].mean(axis=0) - z[c == 0].mean(axis=0)) ** 2) for c in ind.T.astype(int)
    ]
    assert got == pytest.approx(want, rel=1e-4)
    obs = MeanDifferenceStatistic(z, 4)(observed_indicator(9, 4))[0, 0]
    assert obs == pytest.approx(np.sum((z[:4].mean(0) - z[4:].mean(0)) ** 2), rel=1e-4)


def test_pvalue_has_the_k_plus_one_form():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 3)), rng.normal(0.4, 1.0, size=(12, 3))
    n_perm = 999
    res = aad_permutation_test(a, b, n_permutations=n_perm, seed=3)
    assert res.null.shape == (n_perm,)
    assert 1 / (n_perm + 1) <= res.pvalue <= 1.0
    k = res.pvalue * (n_perm + 1) - 1
    assert k == pytest.approx(round(k), abs=1e-9)
    assert res.statistic == pytest.approx(np.linalg.norm(a.mean(0) - b.mean(0)))
    # an extreme shift is never reached by a shuffle: p is exactly 1/(B+1), not 0
    far = aad_permutation_test(a, b + 50.0, n_permutations=n_perm, seed=3)
    assert far.pvalue == pytest.approx(1 / (n_perm + 1))


def test_ties_count_as_reaching_the_observed_value():
    assert permutation_pvalue(1.0, [1.0, 1.0 - 1e-7, 0.5, 2.0]) == pytest.approx(4 / 5)
    assert permutation_pvalue(1.0, [1.0 - 1e-2, 0.5]) == pytest.approx(1 / 3)


def test_identical_cohorts_give_p_one():
    x = np.random.default_rng(4).normal(size=(6, 5))
    res = aad_permutation_test(x, x.copy(), n_permutations=199, seed=0)
    assert res.statistic == 0.0
    assert res.pvalue == 1.0


def test_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(8, 3)), rng.normal(size=(9, 3))
    r1 = aad_permutation_test(a, b, 499, seed=11)
    r2 = aad_permutation_test(a, b, 499, seed=11)
    r3 = aad_permutation_test(a, b, 499, seed=12)
    assert r1.pvalue == r2.pvalue and np.array_equal(r1.null, r2.null)
    assert not np.array_equal(r1.null, r3.null)


def test_more_dimensions_than_subjects_keeps_values():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(5, 40)), rng.normal(0.5, 1.0, size=(6, 40))
    res = aad_permutation_test(a, b, 999, seed=0)
    assert res.statistic == pytest.approx(np.linalg.norm(a.mean(0) - b.mean(0)))
    assert np.all(res.null >= 0)


@pytest.mark.parametrize("shift", [0.0, 0.35, 0.6])
def test_pvalue_agrees_with_scipy_permutation_test(shift):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(15, 4))
    b = rng.normal(shift, 1.0, size=(17, 4))
    pooled = np.vstack([a, b])
    n_perm = 1999

    def statistic(ix, iy, axis):
        xa = pooled[ix.astype(int)]
        xb = pooled[iy.astype(int)]
        return np.linalg.norm(xa.mean(axis=-2) - xb.mean(axis=-2), axis=-1)

    ref = stats.permutation_test(
        (np.arange(15), np.arange(15, 32)),
        statistic,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_perm,
        alternative="greater",
        random_state=np.random.default_rng(1),
    )
    ours = aad_permutation_test(a, b, n_permutations=n_perm, seed=2)
    assert ours.statistic == pytest.approx(ref.statistic)
    p = max(ref.pvalue, 1 / n_perm)
    tolerance = 4 * np.sqrt(2 * p * (1 - p) / n_perm) + 2 / n_perm
    assert abs(ours.pvalue - ref.pvalue) <= tolerance


def test_false_positive_rate_is_calibrated():
    # 1000 null datasets: the rate must be within Monte-Carlo error (sd 0.007) of alpha = 0.05.
    rng = np.random.default_rng(8)
    pvals = np.array(
        [
            aad_permutation_test(
                rng.normal(size=(8, 3)), rng.normal(size=(10, 3)), n_permutations=199, seed=i
            ).pvalue
            for i in range(1000)
        ]
    )
    assert 0.03 <= np.mean(pvals <= 0.05) <= 0.07
    # and the p-values are roughly uniform, not only right at alpha
    assert 0.15 <= np.mean(pvals <= 0.2) <= 0.25


def test_power_rises_with_the_shift():
    rng = np.random.default_rng(9)
    rates = []
    for shift in (0.0, 0.4, 0.8, 1.4):
        hits = [
            aad_permutation_test(
                rng.normal(size=(10, 4)), rng.normal(shift, 1.0, size=(10, 4)), 199, seed=i
            ).pvalue
            <= 0.05
            for i in range(120)
        ]
        rates.append(np.mean(hits))
    assert rates == sorted(rates)
    assert rates[0] < 0.1
    assert rates[-1] > 0.9
