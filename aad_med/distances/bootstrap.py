"""Stage 5, distances: subject bootstrap of cohort means, vectorised (the per-dimension bands of
each cohort's mean; the AAD interval is analytic, :mod:`aad_med.distances.interval`).

Each resample draws subjects with replacement *within* a cohort, so cohort sizes stay fixed; a
resample's mean is a row of ``counts @ x / n``, one matrix product for all resamples. Pure
numpy; never touches files.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import as_cohort_array
from aad_med.errors import ConfigError

#: Largest count matrix built at once, in elements.
CHUNK_ELEMENTS = 4_000_000


def bootstrap_means(
    x: ArrayLike, n_bootstrap: int, rng: np.random.Generator, name: str = "cohort"
) -> np.ndarray:
    """Means of ``n_bootstrap`` resamples (with replacement) of the subjects of one cohort.

    Args:
        x: embeddings ``(n, dim)``.
        n_bootstrap: number of resamples.
        rng: random generator (consumed).
        name: cohort name for error messages.

    Returns:
        ``(n_bootstrap, dim)`` float64 resampled means.
    """
    arr = as_cohort_array(x, name, min_subjects=1)
    if n_bootstrap < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    n = arr.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // n)
    out = np.empty((n_bootstrap, arr.shape[1]))
    for start in range(0, n_bootstrap, chunk):
        m = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(m, n))
        idx += (np.arange(m) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=m * n).reshape(m, n)
        out[start : start + m] = counts @ arr / n
    return out


def percentile_interval(samples: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (``(1-level)/2`` and ``(1+level)/2`` quantiles) along axis 0."""
    s = np.asarray(samples, dtype=np.float64)
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return lo, hi
