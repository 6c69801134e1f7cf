"""Stage 5, distances: per-dimension statistics — two-sample KS tests with Benjamini–Hochberg
FDR, and McCaffrey's histogram divergence (``akld``). Pure numpy/scipy; never touches files."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from aad_med.distances._common import check_pair


def bh_fdr(pvalues: ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), same shape as the input."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    return np.asarray(stats.false_discovery_control(np.clip(p, 0.0, 1.0), method="bh"))


def ks_per_dimension(x_a: ArrayLike, x_b: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-sample Kolmogorov–Smirnov test in every dimension, with BH FDR across dimensions.

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``.
        x_b: embeddings of cohort B, ``(n_b, dim)``.

    Returns:
        ``(statistic, pvalue, qvalue)``, each ``(dim,)``. A dimension constant in both cohorts
        gets statistic 0 and p = 1 when the constants agree.
    """
    a, b = check_pair(x_a, x_b)
    res = stats.ks_2samp(a, b, axis=0)
    stat = np.atleast_1d(np.asarray(res.statistic, dtype=np.float64))
    p = np.atleast_1d(np.asarray(res.pvalue, dtype=np.float64))
    p = np.where(np.isfinite(p), p, 1.0)
    return stat, p, bh_fdr(p)


def akld(x_a: ArrayLike, x_b: ArrayLike, n_bins: int = 10, eps: float = 1e-4) -> float:
    """McCaffrey's autoencoded KL divergence: per-dimension histograms, symmetric KL, averaged.

    For each dimension the pooled values set ``n_bins`` equal-width bins shared by both cohorts;
    each cohort's bin frequencies get ``eps`` added (then renormalised) so empty bins do not give
    infinities, and the divergence is ``KL(P||Q) + KL(Q||P)``. The result is the mean over
    dimensions (a dimension constant in the pooled data contributes 0).

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``.
        x_b: embeddings of cohort B, ``(n_b, dim)``.
        n_bins: histogram bins per dimension.
        eps: additive smoothing of the frequencies.

    Returns:
        The average symmetric KL divergence (nats), ``>= 0``.
    """
    a, b = check_pair(x_a, x_b)
    lo = np.minimum(a.min(axis=0), b.min(axis=0))
    hi = np.maximum(a.max(axis=0), b.max(axis=0))
    width = hi - lo
    total = 0.0
    for j in range(a.shape[1]):
        if width[j] <= 0:
            continue
        edges = np.linspace(lo[j], hi[j], n_bins + 1)
        p = np.histogram(a[:, j], bins=edges)[0] / a.shape[0] + eps
        q = np.histogram(b[:, j], bins=edges)[0] / b.shape[0] + eps
        p /= p.sum()
        q /= q.sum()
        total += float(np.sum((p - q) * np.log(p / q)))
    return total / a.shape[1]
