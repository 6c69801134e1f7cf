"""Display-only summaries that figures need and ``distances`` does not return: bootstrap bands of
cohort means, a 2D PCA projection and covariance ellipses. These draw; they decide nothing (every
reported statistic comes from :mod:`aad_med.distances`)."""

from __future__ import annotations

import numpy as np

CHI2_2DOF_95 = 5.991464547107979
"""95% quantile of chi-square with 2 degrees of freedom (radius² of a 95% normal ellipse)."""


def bootstrap_mean_bands(
    vectors: np.ndarray, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95
) -> np.ndarray:
    """Percentile bootstrap band of a cohort's mean vector, resampling subjects.

    Args:
        vectors: ``(n, D)`` subject vectors of one cohort.
        n_bootstrap: number of resamples.
        seed: random seed.
        level: coverage of the band.

    Returns:
        ``(2, D)`` array: lower and upper bound per dimension.
    """
    x = np.asarray(vectors, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        m = x.mean(axis=0)
        return np.stack([m, m])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_bootstrap, n))
    # Resampled means as one product of index counts with the data: no (B, n, D) tensor.
    counts = np.zeros((n_bootstrap, n))
    np.add.at(counts, (np.repeat(np.arange(n_bootstrap), n), idx.ravel()), 1.0)
    means = counts @ x / n
    alpha = (1.0 - level) / 2.0
    return np.quantile(means, [alpha, 1.0 - alpha], axis=0)


def pca_2d(vectors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Project every cohort's vectors on the first two principal axes of all subjects pooled.

    Returns:
        ``(projected, explained)``: ``{name: (n, 2)}`` and the explained-variance fraction of the
        two axes (zeros when the data have no variance).
    """
    names = list(vectors)
    pooled = np.concatenate([np.asarray(vectors[k], dtype=np.float64) for k in names])
    centre = pooled.mean(axis=0)
    xc = pooled - centre
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    axes = np.zeros((2, pooled.shape[1]))
    k = min(2, vt.shape[0])
    axes[:k] = vt[:k]
    total = float((s**2).sum())
    explained = np.zeros(2)
    if total > 0:
        explained[:k] = s[:k] ** 2 / total
    return {
        n: (np.asarray(vectors[n], dtype=np.float64) - centre) @ axes.T for n in names
    }, explained


def covariance_ellipse(points: np.ndarray, n_points: int = 100) -> np.ndarray | None:
    """Outline of the 95% normal ellipse of 2D ``points``; ``None`` with fewer than 3 points."""
    p = np.asarray(points, dtype=np.float64)
    if p.shape[0] < 3:
        return None
    cov = np.cov(p, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.clip(vals, 0.0, None)
    t = np.linspace(0, 2 * np.pi, n_points)
    circle = np.stack([np.cos(t), np.sin(t)])
    return (vecs @ (np.sqrt(vals * CHI2_2DOF_95)[:, None] * circle)).T + p.mean(axis=0)


def dimension_order(shares: np.ndarray) -> np.ndarray:
    """Dimension indices sorted by decreasing share of AAD² (ties keep index order)."""
    return np.argsort(-np.asarray(shares, dtype=np.float64), kind="stable")
