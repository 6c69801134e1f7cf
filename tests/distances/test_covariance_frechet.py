"""Ledoit–Wolf covariance and the Fréchet distance: reference formulas and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from aad_med.distances.covariance import ledoit_wolf_shrinkage, shrunk_covariance
from aad_med.distances.frechet import frechet_distance, frechet_gaussian


def _lw_reference(x: np.ndarray) -> float:
    """Ledoit & Wolf (2004) lemma 3.2–3.4, written out with explicit outer products."""
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    d2 = np.linalg.norm(s - mu * np.eye(p), "fro") ** 2 / p
    b2 = sum(np.linalg.norm(np.outer(r, r) - s, "fro") ** 2 for r in x) / n**2 / p
    return min(b2, d2) / d2


@pytest.mark.parametrize("n,p", [(40, 5), (12, 30)])
def test_ledoit_wolf_matches_reference(n, p):
    rng = np.random.default_rng(n + p)
    x = rng.normal(size=(n, p)) * np.linspace(0.5, 3.0, p)
    x -= x.mean(axis=0)
    s = ledoit_wolf_shrinkage(x)
    assert s == pytest.approx(_lw_reference(x), rel=1e-10)
    cov = shrunk_covariance(x)
    sample = x.T @ x / (n - 1)
    dense = (1 - s) * sample + s * np.trace(sample) / p * np.eye(p)
    assert cov.matrix() == pytest.approx(dense, abs=1e-10)
    delta = rng.normal(size=p)
    assert cov.mahalanobis_sq(delta) == pytest.approx(delta @ np.linalg.solve(dense, delta))


def test_ledoit_wolf_without_variance_is_zero_shrinkage():
    assert ledoit_wolf_shrinkage(np.zeros((5, 3))) == 0.0


def test_frechet_gaussian_closed_form_diagonal():
    # for commuting (diagonal) covariances: ||Δμ||² + Σ (√a_i - √b_i)²
    mu_a, mu_b = np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 3.0])
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1 + 4 + 9 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    got = frechet_gaussian(mu_a, np.diag(va), mu_b, np.diag(vb))
    assert got == pytest.approx(expected)


def test_frechet_gaussian_general_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    ref = (
        np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.real(np.trace(linalg.sqrtm(s1 @ s2)))
    )
    assert frechet_gaussian(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_from_samples_matches_dense_formula():
    rng = np.random.default_rng(1)
    for na, nb, p in [(40, 50, 6), (8, 9, 30)]:  # the second takes the dim > n path
        a = rng.normal(size=(na, p))
        b = rng.normal(0.3, 1.5, size=(nb, p))
        ca = shrunk_covariance(a - a.mean(0)).matrix()
        cb = shrunk_covariance(b - b.mean(0)).matrix()
        ref = frechet_gaussian(a.mean(0), ca, b.mean(0), cb)
        assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    plain = frechet_distance(a, b, shrinkage=False)
    assert np.isfinite(plain) and plain >= 0


def test_frechet_never_nan_or_negative_on_degenerate_inputs():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 20))
    assert frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-8)
    const = np.ones((4, 3))
    assert frechet_distance(const, const + 2.0) == pytest.approx(12.0)
    low_rank = np.outer(rng.normal(size=6), rng.normal(size=8))
    value = frechet_distance(low_rank, low_rank[::-1] * 1.0000001)
    assert np.isfinite(value) and value >= 0
