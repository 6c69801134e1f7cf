"""Standardised AAD and Hotelling's T²: formulas, calibration, the permutation fallback."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aad_med.distances.covariance import shrunk_covariance
from aad_med.distances.hotelling import (
    hotelling_test,
    mahalanobis_distance,
    pooled_within_covariance,
    standardized_distance,
)


def test_hotelling_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 3)), rng.normal(0.5, 1.0, size=(25, 3))
    delta = a.mean(0) - b.mean(0)
    s = ((a - a.mean(0)).T @ (a - a.mean(0)) + (b - b.mean(0)).T @ (b - b.mean(0))) / 43
    t2 = 20 * 25 / 45 * delta @ np.linalg.solve(s, delta)
    f = (45 - 3 - 1) / (43 * 3) * t2
    res = hotelling_test(a, b)
    assert res.covariance == "pooled"
    assert res.t2 == pytest.approx(t2)
    assert res.pvalue == pytest.approx(stats.f.sf(f, 3, 41))
    assert res.df == (3, 41)


def test_hotelling_f_test_is_calibrated():
    rng = np.random.default_rng(1)
    scales = np.array([1.0, 2.0, 5.0, 0.3])
    p = np.array(
        [
            hotelling_test(
                rng.normal(size=(10, 4)) * scales, rng.normal(size=(9, 4)) * scales
            ).pvalue
            for _ in range(2000)
        ]
    )
    assert 0.035 <= np.mean(p <= 0.05) <= 0.065


def test_more_dimensions_than_subjects_leaves_p_to_permutations():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(6, 12))
    res = hotelling_test(a, b)
    assert res.pvalue is None and res.covariance == "ledoit_wolf_label_free"
    # The T² of the label-free Ledoit–Wolf covariance (the one a permutation test can use),
    # not the Mahalanobis distance of the within-cohort one.
    pooled = np.vstack([a, b])
    centred = pooled - pooled.mean(axis=0)
    sd = centred.std(axis=0, ddof=1)
    corr = shrunk_covariance(centred / sd).matrix()  # dense solve, not the whitening path
    delta = (a.mean(axis=0) - b.mean(axis=0)) / sd
    assert res.t2 == pytest.approx(5 * 6 / 11 * delta @ np.linalg.solve(corr, delta), rel=1e-6)
    assert res.t2 != pytest.approx(5 * 6 / 11 * mahalanobis_distance(a, b) ** 2, rel=1e-3)
    assert np.isfinite(res.t2) and res.t2 > 0


def test_standardized_is_scale_free_and_mahalanobis():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 4)), rng.normal(0.4, 1.0, size=(30, 4))
    scale = np.array([1.0, 10.0, 100.0, 0.01])
    assert mahalanobis_distance(a * scale, b * scale) == pytest.approx(mahalanobis_distance(a, b))
    cov = pooled_within_covariance(a, b)
    delta = a.mean(0) - b.mean(0)
    assert mahalanobis_distance(a, b) == pytest.approx(np.sqrt(delta @ np.linalg.solve(cov, delta)))


def test_constant_dimension_does_not_break_the_test():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))
    a[:, 1] = b[:, 1] = 7.0
    res = hotelling_test(a, b)
    assert res.df == (2, 21)
    assert 0 <= res.pvalue <= 1
    b[:, 1] = 8.0  # differ along a direction without any within-cohort variance
    assert hotelling_test(a, b).pvalue == 0.0
    assert mahalanobis_distance(a, b) == float("inf")


def test_bias_corrected_standardized_distance_has_no_dimension_or_size_drift():
    # With no shift the plain Mahalanobis distance grows like sqrt(D (1/n_a + 1/n_b)); the
    # bias-corrected one is 0 in about half of the data sets at every D and n.
    rng = np.random.default_rng(4)
    for n, dim in ((12, 8), (12, 256), (50, 64), (5, 8)):
        values = np.array(
            [standardized_distance(rng.normal(size=(n, dim)), rng.normal(size=(n, dim)))
             for _ in range(150)]
        )  # fmt: skip
        assert 0.35 <= np.mean(values == 0.0) <= 0.8, (n, dim)
        # E[plain²] = D (1/n_a + 1/n_b); the corrected square keeps only its positive noise
        assert np.mean(values**2) < 0.5 * dim * 2 / n, (n, dim)
    a, b = rng.normal(size=(12, 256)), rng.normal(size=(12, 256))
    assert mahalanobis_distance(a, b) > 5  # the descriptive distance of two samples of one law
    # one dimension shifted by 1 within-cohort SD reads about 1, whatever the units
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    a[:, 3] += 1.0
    assert standardized_distance(a, b) == pytest.approx(1.0, abs=0.15)
    scale = np.array([1, 10, 0.1, 3, 1, 1, 100, 1e-3])
    assert standardized_distance(a * scale, b * scale) == pytest.approx(standardized_distance(a, b))


def test_standardized_distance_edge_cases():
    rng = np.random.default_rng(5)
    assert standardized_distance(rng.normal(size=(2, 3)), rng.normal(size=(2, 3))) is None
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    a[:, 1], b[:, 1] = 1.0, 2.0  # differ along a dimension without spread
    assert standardized_distance(a, b) == float("inf")
    assert standardized_distance(a, a.copy()) == 0.0
