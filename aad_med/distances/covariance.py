"""Stage 5, distances: Ledoit–Wolf shrinkage covariance, stored by its spectrum so it works when
there are more dimensions than subjects. Pure numpy; never touches files.

Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices":
``Σ = (1 - s) S + s μ I`` with ``μ = tr(S)/D`` and the shrinkage ``s`` that minimises the expected
Frobenius loss. The formula below is the one scikit-learn implements (``ledoit_wolf_shrinkage``),
rewritten with the Gram matrix so it costs ``O(n D min(n, D))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def ledoit_wolf_shrinkage(xc: ArrayLike) -> float:
    """Ledoit–Wolf shrinkage intensity for already-centred data.

    Args:
        xc: centred data, shape ``(n, D)`` (rows are observations).

    Returns:
        ``s`` in ``[0, 1]``; 0 when the data have no variance.
    """
    x = np.asarray(xc, dtype=np.float64)
    n, p = x.shape
    if n == 0 or p == 0:
        return 0.0
    row_sq = np.einsum("ij,ij->i", x, x)
    trace_sum = float(row_sq.sum()) / n  # tr(S) with S = X^T X / n
    mu = trace_sum / p
    gram = x @ x.T if n <= p else x.T @ x
    delta_ = float(np.sum(gram * gram)) / n**2  # ||S||_F^2
    beta_ = float(np.sum(row_sq * row_sq))  # sum_i ||x_i||^4
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace_sum + p * mu * mu) / p  # ||S - mu I||_F^2 / p
    beta = min(beta, delta)
    if beta <= 0.0 or delta <= 0.0:
        return 0.0
    return float(min(1.0, beta / delta))


@dataclass(frozen=True)
class ShrunkCovariance:
    """A covariance ``Σ = V diag(values) Vᵀ + floor (I - V Vᵀ)`` in ``dim`` dimensions.

    Attributes:
        vectors: orthonormal columns spanning the data, shape ``(dim, r)``.
        values: eigenvalues of ``Σ`` along ``vectors`` (already shrunk), shape ``(r,)``.
        floor: the eigenvalue of ``Σ`` on the orthogonal complement (``s μ``).
        shrinkage: the Ledoit–Wolf intensity ``s``.
        dim: the ambient dimension ``D``.
    """

    vectors: np.ndarray
    values: np.ndarray
    floor: float
    shrinkage: float
    dim: int

    def matrix(self) -> np.ndarray:
        """The dense ``(D, D)`` matrix (for small ``D`` and tests)."""
        v = self.vectors
        dense = (v * self.values) @ v.T
        dense += self.floor * (np.eye(self.dim) - v @ v.T)
        return (dense + dense.T) / 2

    def mahalanobis_sq(self, delta: ArrayLike) -> float:
        """``δᵀ Σ⁻¹ δ``; ``inf`` when ``Σ`` is singular along a direction ``δ`` uses."""
        d = np.asarray(delta, dtype=np.float64).ravel()
        coef = self.vectors.T @ d
        total = float(d @ d)
        scale = max(total, np.finfo(float).tiny)
        pos = self.values > 0
        if np.any(coef[~pos] ** 2 > 1e-20 * scale):
            return float("inf")
        inside = float(np.sum(coef[pos] ** 2 / self.values[pos]))
        resid = max(total - float(coef @ coef), 0.0)
        if resid <= 1e-12 * scale:
            return inside
        if self.floor <= 0:
            return float("inf")
        return inside + resid / self.floor

    def whiten(self, coords: np.ndarray) -> np.ndarray:
        """Maps rows already expressed in ``vectors`` coordinates to whitened coordinates.

        Components with zero variance are dropped (data have nothing there).
        """
        keep = self.values > 0
        return coords[:, keep] / np.sqrt(self.values[keep])


def _spectrum(xc: np.ndarray, denom: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors/values of ``xcᵀ xc / denom`` restricted to its range (via the smaller Gram)."""
    n, p = xc.shape
    if p <= n:
        vals, vecs = np.linalg.eigh(xc.T @ xc / denom)
    else:
        gvals, u = np.linalg.eigh(xc @ xc.T / denom)
        keep = gvals > gvals.max(initial=0.0) * 1e-12
        gvals, u = gvals[keep], u[:, keep]
        vecs = xc.T @ u / np.sqrt(gvals * denom)
        vals = gvals
    vals = np.clip(vals, 0.0, None)
    return vecs, vals


def shrunk_covariance(xc: ArrayLike, denom: float | None = None) -> ShrunkCovariance:
    """Ledoit–Wolf covariance of centred data.

    Args:
        xc: centred rows, shape ``(n, D)``. For a pooled within-group covariance pass the rows
            centred by their own group's mean and ``denom = n - n_groups``.
        denom: divisor of the scatter matrix (default ``n - 1``).

    Returns:
        The shrunk covariance as a :class:`ShrunkCovariance`.
    """
    x = np.asarray(xc, dtype=np.float64)
    n, p = x.shape
    denom = float(n - 1 if denom is None else denom)
    if p == 0:
        return ShrunkCovariance(np.zeros((0, 0)), np.zeros(0), 0.0, 0.0, 0)
    s = ledoit_wolf_shrinkage(x)
    vecs, vals = _spectrum(x, denom)
    mu = float(np.einsum("ij,ij->", x, x)) / denom / p
    return ShrunkCovariance(
        vectors=vecs,
        values=(1.0 - s) * vals + s * mu,
        floor=s * mu,
        shrinkage=s,
        dim=p,
    )
