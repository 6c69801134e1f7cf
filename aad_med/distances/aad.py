"""Stage 5, distances: the Autoencoder Average Distance itself, its unbiased square, and the
attribution of AAD² to latent dimensions. Pure numpy; never touches files."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import check_pair


def mean_difference(x_a: ArrayLike, x_b: ArrayLike) -> np.ndarray:
    """Returns ``mean_A - mean_B`` (subjects weighted equally), shape ``(dim,)``."""
    a, b = check_pair(x_a, x_b)
    return a.mean(axis=0) - b.mean(axis=0)


def aad(x_a: ArrayLike, x_b: ArrayLike) -> float:
    """The Autoencoder Average Distance: Euclidean distance between the cohort mean vectors.

    Args:
        x_a: embeddings of cohort A, shape ``(n_a, dim)``.
        x_b: embeddings of cohort B, shape ``(n_b, dim)``.

    Returns:
        ``||mean_A - mean_B||_2``.
    """
    return float(np.linalg.norm(mean_difference(x_a, x_b)))


def aad2_unbiased(x_a: ArrayLike, x_b: ArrayLike) -> float:
    """Unbiased estimate of the squared distance between the population means.

    ``||Δ||² - tr(Σ_A)/n_A - tr(Σ_B)/n_B`` with sample covariances (ddof=1). Its expectation is
    the true squared mean distance, so it is near zero (and may be negative) when the cohorts
    share a mean, unlike ``aad**2`` which is inflated by sampling noise. It equals the unbiased
    (U-statistic) MMD² with a linear kernel (Gretton et al. 2012, eq. 3).

    Args:
        x_a: embeddings of cohort A, shape ``(n_a, dim)``, ``n_a >= 2``.
        x_b: embeddings of cohort B, shape ``(n_b, dim)``, ``n_b >= 2``.
    """
    a, b = check_pair(x_a, x_b)
    delta = a.mean(axis=0) - b.mean(axis=0)
    tr_a = float(np.sum(a.var(axis=0, ddof=1)))
    tr_b = float(np.sum(b.var(axis=0, ddof=1)))
    return float(delta @ delta - tr_a / a.shape[0] - tr_b / b.shape[0])


def aad_unbiased(x_a: ArrayLike, x_b: ArrayLike) -> float:
    """Bias-corrected AAD: ``sqrt(max(0, aad2_unbiased))``.

    Plain AAD is inflated by sampling noise (its square by ``tr(Σ_A)/n_A + tr(Σ_B)/n_B``);
    this estimate removes that, so it is 0 in about half of the data sets where the means are
    equal and tracks ``||μ_A - μ_B||`` once the distance is above the noise.
    """
    return float(np.sqrt(max(aad2_unbiased(x_a, x_b), 0.0)))


def dimension_shares(delta: ArrayLike) -> list[tuple[int, float]]:
    """Ranks latent dimensions by their share of AAD²: ``(Δμ_j)² / ||Δμ||²``.

    Args:
        delta: the mean difference vector, shape ``(dim,)``.

    Returns:
        ``[(dim_index, share), ...]`` for every dimension, largest share first (ties by index).
        Shares sum to 1; all are 0 when the means coincide.
    """
    d = np.asarray(delta, dtype=np.float64).ravel()
    sq = d * d
    total = float(sq.sum())
    shares = sq / total if total > 0 else np.zeros_like(sq)
    order = np.lexsort((np.arange(d.size), -shares))
    return [(int(j), float(shares[j])) for j in order]
