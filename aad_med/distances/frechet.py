"""Stage 5, distances: Fréchet distance between Gaussian fits of two cohorts (as in FID/FRD).

``||Δμ||² + tr(Σ_A + Σ_B - 2 (Σ_A Σ_B)^{1/2})``. The trace of the matrix square root is computed
as the sum of square roots of the eigenvalues of the symmetric PSD matrix
``Σ_A^{1/2} Σ_B Σ_A^{1/2}`` (clipped at 0), in float64, so it is never complex, NaN or negative
(``scipy.linalg.sqrtm`` of the non-symmetric product is). Covariances are Ledoit–Wolf shrunk.
When ``dim`` exceeds the pooled subjects, both shrunk covariances are ``s μ I`` outside the span
of the data, so the computation is done exactly in that span plus a closed-form remainder.
Pure numpy; never touches files.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import check_pair
from aad_med.distances.covariance import ShrunkCovariance, shrunk_covariance


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """``tr((Σ_A Σ_B)^{1/2})`` for symmetric PSD matrices, via ``Σ_A^{1/2} Σ_B Σ_A^{1/2}``."""
    root_a = _psd_sqrt(np.asarray(cov_a, dtype=np.float64))
    m = root_a @ np.asarray(cov_b, dtype=np.float64) @ root_a
    vals = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sum(np.sqrt(np.clip(vals, 0.0, None))))


def frechet_gaussian(mu_a: ArrayLike, cov_a: ArrayLike, mu_b: ArrayLike, cov_b: ArrayLike) -> float:
    """Fréchet (2-Wasserstein²) distance between ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``.

    Returns:
        A finite value ``>= 0``.
    """
    ca = np.asarray(cov_a, dtype=np.float64)
    cb = np.asarray(cov_b, dtype=np.float64)
    d = np.asarray(mu_a, dtype=np.float64) - np.asarray(mu_b, dtype=np.float64)
    value = float(d @ d) + float(np.trace(ca) + np.trace(cb)) - 2.0 * trace_sqrt_product(ca, cb)
    return max(value, 0.0)


def _restricted(cov: ShrunkCovariance, basis: np.ndarray) -> np.ndarray:
    """``Qᵀ Σ Q`` for orthonormal ``Q`` whose span contains ``cov.vectors``."""
    proj = basis.T @ cov.vectors
    m = (proj * (cov.values - cov.floor)) @ proj.T
    m += cov.floor * np.eye(basis.shape[1])
    return (m + m.T) / 2


def frechet_distance(x_a: ArrayLike, x_b: ArrayLike, shrinkage: bool = True) -> float:
    """Fréchet distance between Gaussian fits of two cohorts' embeddings.

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``.
        x_b: embeddings of cohort B, ``(n_b, dim)``.
        shrinkage: Ledoit–Wolf covariances (default); plain sample covariances otherwise.

    Returns:
        A finite value ``>= 0``.
    """
    a, b = check_pair(x_a, x_b)
    dim = a.shape[1]
    delta = a.mean(axis=0) - b.mean(axis=0)
    ca = a - a.mean(axis=0)
    cb = b - b.mean(axis=0)
    if not shrinkage:
        sa = ca.T @ ca / (a.shape[0] - 1)
        sb = cb.T @ cb / (b.shape[0] - 1)
        return frechet_gaussian(delta, sa, np.zeros(dim), sb) if dim else 0.0
    cov_a = shrunk_covariance(ca)
    cov_b = shrunk_covariance(cb)
    span = np.hstack([cov_a.vectors, cov_b.vectors])
    u, s, _ = np.linalg.svd(span, full_matrices=False)
    basis = u[:, s > s.max(initial=0.0) * 1e-10] if s.size else u[:, :0]
    rest = dim - basis.shape[1]
    value = float(delta @ delta)
    if basis.shape[1]:
        ra = _restricted(cov_a, basis)
        rb = _restricted(cov_b, basis)
        value += float(np.trace(ra) + np.trace(rb)) - 2.0 * trace_sqrt_product(ra, rb)
    if rest > 0:
        # Outside the data span both covariances are isotropic: (√fa - √fb)² per dimension.
        value += rest * (np.sqrt(cov_a.floor) - np.sqrt(cov_b.floor)) ** 2
    return max(value, 0.0)
