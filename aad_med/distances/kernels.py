"""Stage 5, distances: kernel and distance-based two-sample statistics (RBF MMD², energy).

They see differences in the whole distribution (spread, shape), not only in the means, which is
what AAD misses. Pure numpy; never touches files. Their permutation tests use
:class:`aad_med.distances.permutation.KernelStatistic` on the matrices built here, with the
bandwidth fitted once on the pooled data so it is the same for every relabelling.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import check_pair


def pairwise_sq_distances(z: ArrayLike) -> np.ndarray:
    """Squared Euclidean distances between rows, ``(n, n)``, exactly 0 on the diagonal."""
    x = np.asarray(z, dtype=np.float64)
    x = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.clip(d2, 0.0, None, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def median_heuristic(d2: np.ndarray) -> float:
    """Bandwidth ``h`` = median pairwise distance (off-diagonal); 1.0 if all points coincide."""
    iu = np.triu_indices(d2.shape[0], k=1)
    h = float(np.median(np.sqrt(d2[iu]))) if iu[0].size else 0.0
    return h if h > 0 else 1.0


def rbf_kernel(d2: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian kernel ``exp(-d² / (2 h²))`` from squared distances."""
    return np.exp(-d2 / (2.0 * bandwidth * bandwidth))


def _split_sums(k: np.ndarray, n_a: int) -> tuple[float, float, float]:
    kaa = k[:n_a, :n_a]
    kbb = k[n_a:, n_a:]
    kab = k[:n_a, n_a:]
    return float(kaa.sum() - np.trace(kaa)), float(kbb.sum() - np.trace(kbb)), float(kab.sum())


def mmd2_from_kernel(k: np.ndarray, n_a: int) -> float:
    """Unbiased MMD² from a pooled kernel matrix whose first ``n_a`` rows are cohort A."""
    na, nb = n_a, k.shape[0] - n_a
    s_aa, s_bb, s_ab = _split_sums(k, na)
    return s_aa / (na * (na - 1)) + s_bb / (nb * (nb - 1)) - 2.0 * s_ab / (na * nb)


def energy_from_distances(d: np.ndarray, n_a: int) -> float:
    """Energy distance (V-statistic) from a pooled distance matrix, cohort A first."""
    na, nb = n_a, d.shape[0] - n_a
    s_aa, s_bb, s_ab = _split_sums(d, na)
    return 2.0 * s_ab / (na * nb) - s_aa / na**2 - s_bb / nb**2


def mmd2_unbiased(x_a: ArrayLike, x_b: ArrayLike, bandwidth: float | None = None) -> float:
    """Unbiased (U-statistic) MMD² with a Gaussian kernel (Gretton et al. 2012, eq. 3).

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``.
        x_b: embeddings of cohort B, ``(n_b, dim)``.
        bandwidth: kernel width ``h``; default: median pairwise distance of the pooled data.

    Returns:
        MMD² (near 0, possibly negative, when the distributions are equal).
    """
    a, b = check_pair(x_a, x_b)
    d2 = pairwise_sq_distances(np.vstack([a, b]))
    h = median_heuristic(d2) if bandwidth is None else float(bandwidth)
    return mmd2_from_kernel(rbf_kernel(d2, h), a.shape[0])


def energy_distance(x_a: ArrayLike, x_b: ArrayLike) -> float:
    """Energy distance ``2 E|A-B| - E|A-A'| - E|B-B'|`` (Székely & Rizzo; V-statistic).

    Zero only when the two empirical distributions are equal; sensitive to spread and shape.
    """
    a, b = check_pair(x_a, x_b)
    d = np.sqrt(pairwise_sq_distances(np.vstack([a, b])))
    return energy_from_distances(d, a.shape[0])
