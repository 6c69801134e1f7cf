"""Stage 5, distances: the scale-free AAD (Mahalanobis distance between the cohort means) and
Hotelling's T² with a Ledoit–Wolf pooled covariance. Pure numpy/scipy; never touches files.

Plain AAD depends on the scale of each latent dimension; the standardised version measures the
mean shift in units of the within-cohort spread, so it is comparable across encoders.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from aad_med.distances._common import check_pair
from aad_med.distances.covariance import ShrunkCovariance, shrunk_covariance


def pooled_within_covariance(x_a: ArrayLike, x_b: ArrayLike) -> ShrunkCovariance:
    """Ledoit–Wolf shrinkage of the pooled within-cohort covariance (divisor ``n_a+n_b-2``)."""
    a, b = check_pair(x_a, x_b)
    centred = np.vstack([a - a.mean(axis=0), b - b.mean(axis=0)])
    return shrunk_covariance(centred, denom=a.shape[0] + b.shape[0] - 2)


def aad_standardized(x_a: ArrayLike, x_b: ArrayLike) -> float:
    """Mahalanobis distance between the cohort means, ``sqrt(Δᵀ Σ⁻¹ Δ)``, Σ pooled LW.

    Returns:
        The distance; ``inf`` if the cohorts differ along a direction without any variance,
        0 if the means coincide.
    """
    a, b = check_pair(x_a, x_b)
    delta = a.mean(axis=0) - b.mean(axis=0)
    if not np.any(delta):
        return 0.0
    return float(np.sqrt(pooled_within_covariance(a, b).mahalanobis_sq(delta)))


def hotelling_t2(x_a: ArrayLike, x_b: ArrayLike) -> tuple[float, float | None]:
    """Hotelling's two-sample T² with the pooled Ledoit–Wolf covariance, and its F p-value.

    ``T² = n_a n_b / (n_a + n_b) · Δᵀ Σ⁻¹ Δ``; when ``n_a + n_b - 2 > dim`` the p-value uses
    ``(n - dim - 1) / ((n - 2) dim) · T² ~ F(dim, n - dim - 1)`` (exact for the unshrunk
    covariance under normality, approximate with shrinkage, which fades as ``n`` grows relative
    to ``dim``). Otherwise the F distribution does not exist and ``None`` is returned for the
    p-value: use a permutation test (``compare_embeddings`` does).

    Returns:
        ``(t2, p_or_None)``; ``t2`` is ``inf`` as in :func:`aad_standardized`.
    """
    a, b = check_pair(x_a, x_b)
    return hotelling_from_standardized(aad_standardized(a, b), a.shape[0], b.shape[0], a.shape[1])


def hotelling_from_standardized(
    standardized: float, n_a: int, n_b: int, dim: int
) -> tuple[float, float | None]:
    """T² and its F p-value (or ``None`` when ``n_a + n_b - 2 <= dim``) from the Mahalanobis
    distance between the means; see :func:`hotelling_t2`."""
    n = n_a + n_b
    t2 = n_a * n_b / n * standardized**2
    if n - 2 <= dim:
        return float(t2), None
    if not np.isfinite(t2):
        return float(t2), 0.0
    f_stat = (n - dim - 1) / ((n - 2) * dim) * t2
    return float(t2), float(stats.f.sf(f_stat, dim, n - dim - 1))


def label_free_whitened(z: np.ndarray) -> np.ndarray:
    """Pooled rows in coordinates where the label-free Ledoit–Wolf covariance is the identity.

    Used for permutation tests of T²: the covariance is estimated without the labels, so it is
    the same under every relabelling and the permutation p-value is exact.
    """
    zc = np.asarray(z, dtype=np.float64) - np.mean(z, axis=0)
    cov = shrunk_covariance(zc)
    return cov.whiten(zc @ cov.vectors)
