"""Per-dimension KS tests with FDR, and McCaffrey's histogram divergence (akld)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aad_med.distances.univariate import akld, bh_fdr, ks_per_dimension


def test_bh_fdr_matches_definition():
    # sorted p 0.01, 0.03, 0.04, 0.5 -> p * m / rank = 0.04, 0.06, 0.0533, 0.5, then the
    # step-up minimum from the top: 0.04, 0.0533, 0.0533, 0.5
    q = bh_fdr([0.01, 0.04, 0.03, 0.5])
    assert q == pytest.approx([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    assert bh_fdr([]).size == 0


def test_ks_per_dimension_matches_scipy_and_flags_shifted_dims():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5))
    b = rng.normal(size=(45, 5))
    b[:, 2] += 1.5
    stat, p, q = ks_per_dimension(a, b)
    for j in range(5):
        ref = stats.ks_2samp(a[:, j], b[:, j])
        assert stat[j] == pytest.approx(ref.statistic)
        assert p[j] == pytest.approx(ref.pvalue)
    assert list(np.flatnonzero(q < 0.05)) == [2]


def test_ks_constant_dimension_and_one_dimension():
    a = np.ones((4, 1))
    stat, p, q = ks_per_dimension(a, a + 0.0)
    assert stat[0] == 0 and p[0] == 1 and q[0] == 1


def test_akld_zero_for_identical_positive_for_different():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 3))
    assert akld(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    y = rng.normal(2.0, 1.0, size=(50, 3))
    assert akld(x, y) > 1.0
    assert akld(x, y) == pytest.approx(akld(y, x))  # symmetric
    const = np.zeros((5, 2))
    assert akld(const, const) == 0.0


def test_akld_hand_computed():
    a = np.array([[0.0], [0.0], [1.0], [1.0]])
    b = np.array([[0.0], [1.0], [1.0], [1.0]])
    p = np.array([0.5, 0.5]) + 1e-4
    q = np.array([0.25, 0.75]) + 1e-4
    p, q = p / p.sum(), q / q.sum()
    expected = np.sum((p - q) * np.log(p / q))
    assert akld(a, b, n_bins=2) == pytest.approx(expected)
