"""AAD, unbiased AAD² and attribution: closed-form values and MONAI's MMDMetric."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import MMDMetric

from aad_med.distances import aad, aad2_unbiased, aad_unbiased, dimension_shares
from aad_med.errors import ConfigError


def test_aad_of_known_vectors():
    a = np.array([[0.0, 0.0], [2.0, 0.0]])  # mean (1, 0)
    b = np.array([[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]])  # mean (4, 4)
    assert aad(a, b) == pytest.approx(5.0)
    assert aad(b, a) == pytest.approx(5.0)


def test_aad2_unbiased_closed_form():
    a = np.array([[0.0, 0.0], [2.0, 0.0]])  # tr Σ_A = 2 (ddof=1)
    b = np.array([[4.0, 3.0], [4.0, 5.0], [4.0, 4.0]])  # mean (4, 4), tr Σ_B = 1
    assert aad2_unbiased(a, b) == pytest.approx(25.0 - 2.0 / 2 - 1.0 / 3)


@pytest.mark.parametrize("n,dim", [(2, 1), (7, 5), (30, 16)])
def test_aad2_unbiased_equals_monai_mmd_linear_kernel(n, dim):
    # MONAI's MMDMetric (default y_mapping=None) is the unbiased U-statistic MMD² with the
    # linear kernel <x, y> (diagonals excluded within samples); it needs equal sizes.
    rng = np.random.default_rng(n * 100 + dim)
    a = rng.normal(0.3, 1.0, (n, dim))
    b = rng.normal(0.0, 2.0, (n, dim))
    monai_value = MMDMetric()(torch.from_numpy(b), torch.from_numpy(a)).item()
    assert aad2_unbiased(a, b) == pytest.approx(monai_value, rel=1e-9, abs=1e-12)


def test_aad2_unbiased_is_unbiased_under_equal_means():
    rng = np.random.default_rng(0)
    vals = [aad2_unbiased(rng.normal(size=(6, 3)), rng.normal(size=(9, 3))) for _ in range(4000)]
    se = np.std(vals) / np.sqrt(len(vals))
    assert abs(np.mean(vals)) < 4 * se
    # while the plain squared AAD is inflated by tr Σ (1/n_a + 1/n_b) = 3 * (1/6 + 1/9) = 0.83
    plain = [aad(rng.normal(size=(6, 3)), rng.normal(size=(9, 3))) ** 2 for _ in range(4000)]
    assert np.mean(plain) == pytest.approx(3 * (1 / 6 + 1 / 9), rel=0.1)


def test_dimension_shares_rank_and_sum_to_one():
    shares = dimension_shares([1.0, -3.0, 0.0, 2.0])
    assert [d for d, _ in shares] == [1, 3, 0, 2]
    assert [s for _, s in shares] == pytest.approx([9 / 14, 4 / 14, 1 / 14, 0.0])
    assert dimension_shares([0.0, 0.0]) == [(0, 0.0), (1, 0.0)]


def test_one_dimensional_and_one_subject_inputs():
    assert aad(np.array([1.0, 3.0]), np.array([0.0, 0.0, 0.0])) == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="cohort 'a' has 1 subject"):
        aad(np.ones((1, 4)), np.ones((3, 4)))
    with pytest.raises(ConfigError, match="different dimensions"):
        aad(np.ones((2, 4)), np.ones((3, 5)))
    with pytest.raises(ConfigError, match="NaN"):
        aad(np.array([[np.nan, 1.0], [0.0, 1.0]]), np.ones((3, 2)))


def test_aad_unbiased_is_the_root_of_the_positive_part():
    rng = np.random.default_rng(11)
    same = [aad_unbiased(rng.normal(size=(10, 32)), rng.normal(size=(10, 32))) for _ in range(200)]
    # equal means: 0 about half of the time, while plain AAD sits near sqrt(32 * 2 / 10) = 2.5
    assert 0.3 <= np.mean(np.array(same) == 0.0) <= 0.7 and np.median(same) < 1.0
    a, b = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    a[:, :4] += 1.0  # true distance 2
    assert aad_unbiased(a, b) == pytest.approx(2.0, abs=0.1)
    assert aad_unbiased(a, b) == pytest.approx(np.sqrt(aad2_unbiased(a, b)))
    assert aad(a, b) > aad_unbiased(a, b)
