"""Stage 5, distances: views of k cohorts at once — the pairwise AAD matrix, a classical MDS
map and an average-linkage dendrogram. Pure numpy/scipy; never touches files."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform


def classical_mds(distances: ArrayLike, n_components: int = 2) -> np.ndarray:
    """Classical (Torgerson) multidimensional scaling of a symmetric distance matrix.

    Args:
        distances: ``(k, k)`` symmetric, zero diagonal.
        n_components: output dimensions.

    Returns:
        ``(k, n_components)`` coordinates whose Euclidean distances approximate the input
        (exactly when it is Euclidean of that rank); columns with no positive eigenvalue are 0.
        The sign of each axis is fixed so the first cohort has a non-positive coordinate.
    """
    d = np.asarray(distances, dtype=np.float64)
    k = d.shape[0]
    j = np.eye(k) - 1.0 / k
    gram = -0.5 * j @ (d * d) @ j
    vals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(vals)[::-1][:n_components]
    coords = np.zeros((k, n_components))
    for col, idx in enumerate(order):
        if vals[idx] > 1e-12 * max(vals.max(), 0.0):
            coords[:, col] = vecs[:, idx] * np.sqrt(vals[idx])
    for col in range(n_components):
        nonzero = np.flatnonzero(np.abs(coords[:, col]) > 0)
        if nonzero.size and coords[nonzero[0], col] > 0:
            coords[:, col] *= -1
    return coords


def average_linkage(distances: ArrayLike) -> np.ndarray:
    """Average-linkage (UPGMA) hierarchical clustering of cohorts.

    Returns:
        The scipy linkage matrix ``(k-1, 4)`` for :func:`scipy.cluster.hierarchy.dendrogram`.
    """
    d = np.asarray(distances, dtype=np.float64)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return hierarchy.linkage(squareform(d, checks=False), method="average")
