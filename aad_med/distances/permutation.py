"""Stage 5, distances: vectorised label-permutation tests shared by every statistic.

Cohort labels are shuffled per subject: each permutation keeps the cohort sizes and assigns a
uniformly random subset of ``n_a`` of the pooled subjects to cohort A. All permutations of a
chunk are one ``(n, m)`` 0/1 matrix, so every statistic that is a linear or quadratic function of
the group indicator is one matrix product per chunk (float32, which halves the time of the
product; the observed value goes through the same arithmetic so ties are compared like with
like). The p-value counts the observed labelling as one of the permutations,
``p = (k + 1) / (B + 1)`` (Phipson & Smyth 2010), so it is never 0 and the test is exact.

Pure numpy; never touches files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import check_pair
from aad_med.errors import ConfigError

#: Ties: a permuted statistic within this fraction of the larger of |observed| and the median
#: |null| counts as ">= observed" (float32 rounding differs between permutations that are equal
#: in exact arithmetic, e.g. the full label swap when n_a == n_b).
TIE_RTOL = 1e-4

#: Largest indicator chunk, in elements (a 16 MB float32 matrix).
CHUNK_ELEMENTS = 4_000_000


def subset_indicators(
    n: int, n_a: int, n_permutations: int, rng: np.random.Generator, chunk: int | None = None
) -> Iterator[np.ndarray]:
    """Yields random group-A indicators, each column a uniform random ``n_a``-subset of ``n``.

    Knuth's selection sampling (Algorithm S), run for all permutations of a chunk at once: row
    ``i`` is selected when ``u_i (n - i) < needed`` for a uniform ``u_i``, i.e. with probability
    ``needed / (n - i)``. It draws ``n`` uniforms per permutation, never sorts, and always
    selects exactly ``n_a``: ``u < 1`` and ``(n - i)`` is an integer below 2²⁴, so the float32
    product stays below ``n - i`` when every remaining subject is needed, and nothing is
    selected once none is.

    Args:
        n: pooled number of subjects.
        n_a: size of group A (``0 < n_a < n``).
        n_permutations: total number of columns to yield.
        rng: the random generator (consumed).
        chunk: columns per yielded matrix (default from :data:`CHUNK_ELEMENTS`).

    Yields:
        float32 arrays of shape ``(n, m)`` with 0/1 entries and column sums ``n_a``. The buffer
        is reused for the next chunk: consume it before advancing the iterator.
    """
    if chunk is None:
        chunk = max(64, CHUNK_ELEMENTS // max(n, 1))
    chunk = max(1, min(chunk, n_permutations))
    remaining_rows = (n - np.arange(n, dtype=np.float32))[:, None]
    u_buf = np.empty(n * chunk, dtype=np.float32)
    ind_buf = np.empty(n * chunk, dtype=np.float32)
    remaining = n_permutations
    while remaining > 0:
        m = min(chunk, remaining)
        u = u_buf[: n * m].reshape(n, m)
        ind = ind_buf[: n * m].reshape(n, m)
        rng.random(dtype=np.float32, out=u)
        u *= remaining_rows
        need = np.full(m, n_a, dtype=np.float32)
        for i in range(n):
            np.less(u[i], need, out=ind[i], casting="unsafe")
            need -= ind[i]
        yield ind
        remaining -= m


def observed_indicator(n: int, n_a: int) -> np.ndarray:
    """The observed labelling (first ``n_a`` pooled rows are cohort A) as an ``(n, 1)`` column."""
    ind = np.zeros((n, 1), dtype=np.float32)
    ind[:n_a] = 1.0
    return ind


class MeanDifferenceStatistic:
    """Squared norms of the permuted mean difference, for one or more column blocks of ``z``.

    ``Δ = mean_A - mean_B = (1/n_a + 1/n_b) zᵀa - (Σ z)/n_b`` for indicator ``a``, so all
    permutations of a chunk cost one product ``zᵀ A``. Blocks let several mean-based statistics
    (e.g. AAD on the raw vectors and a Mahalanobis distance on whitened ones) share it.

    Args:
        z: pooled rows, cohort A first, shape ``(n, q)``.
        n_a: size of cohort A.
        blocks: column slices; one statistic per slice (default: all columns).
    """

    def __init__(self, z: np.ndarray, n_a: int, blocks: Sequence[slice] | None = None):
        z = np.asarray(z, dtype=np.float64)
        n = z.shape[0]
        self.n_a, self.n_b = n_a, n - n_a
        # Centring (label-free) makes the float32 sums small and well-conditioned.
        zc = z - z.mean(axis=0)
        self.zt = np.ascontiguousarray(zc.T, dtype=np.float32)
        self.offset = (self.zt.sum(axis=1, dtype=np.float64) / self.n_b).astype(np.float32)[:, None]
        self.scale = np.float32(1.0 / self.n_a + 1.0 / self.n_b)
        self.blocks = list(blocks) if blocks is not None else [slice(0, z.shape[1])]

    def __call__(self, ind: np.ndarray) -> np.ndarray:
        """Returns the squared norms, shape ``(n_blocks, m)`` (float64)."""
        s = self.zt @ ind
        s *= self.scale
        s -= self.offset
        return np.stack([np.einsum("ij,ij->j", s[b], s[b]).astype(np.float64) for b in self.blocks])


class KernelStatistic:
    """Kernel two-sample statistics from one pooled ``(n, n)`` matrix per statistic.

    Each matrix ``K`` is used off its diagonal only (``K0``). For indicator ``a`` the within- and
    between-group sums are ``s_AA = aᵀK0a``, ``s_BB = T - 2aᵀr + s_AA``, ``s_AB = aᵀr - s_AA``
    (``r = K0 1``, ``T = 1ᵀK0 1``). To keep float32 products accurate, ``K0`` is split as
    ``K̃ + (f_i + f_j)`` with ``K̃`` having zero row sums, so ``aᵀK0a = aᵀK̃a + 2(n_a-1) aᵀf`` and
    ``aᵀr = (n-2) aᵀf + n_a Σf`` are exact rewrites with small float32 terms.

    Args:
        matrices: pooled matrices (cohort A rows/columns first), each ``(n, n)``.
        kinds: for each matrix, ``"mmd_unbiased"`` (U-statistic MMD² of a kernel) or
            ``"energy"`` (V-statistic energy distance of a distance matrix).
        n_a: size of cohort A.
    """

    def __init__(self, matrices: Sequence[np.ndarray], kinds: Sequence[str], n_a: int):
        n = matrices[0].shape[0]
        if n < 4:
            raise ConfigError("kernel statistics need at least 4 pooled subjects")
        self.n, self.n_a, self.n_b = n, n_a, n - n_a
        self.kinds = list(kinds)
        rows, fs, fsums = [], [], []
        for k in matrices:
            k0 = np.array(k, dtype=np.float64)
            np.fill_diagonal(k0, 0.0)
            r = k0.sum(axis=1)
            f_total = r.sum() / (2 * n - 2)
            f = (r - f_total) / (n - 2)
            kt = k0 - f[:, None] - f[None, :]
            np.fill_diagonal(kt, 0.0)
            rows.append(kt)
            fs.append(f)
            fsums.append(f_total)
        self.n_mats = len(rows)
        self.f_mean = np.array([f.mean() for f in fs])
        # One product per chunk: the K̃ blocks, then the centred f rows.
        self.stack = np.ascontiguousarray(
            np.vstack(rows + [np.stack([f - f.mean() for f in fs])]), dtype=np.float32
        )
        self.f_total = np.array(fsums)
        self.t_total = np.array([(2 * n - 2) * ft for ft in fsums])  # T = Σr = (2n-2)F

    def __call__(self, ind: np.ndarray) -> np.ndarray:
        """Returns the statistics, shape ``(n_matrices, m)`` (float64)."""
        n, na, nb = self.n, self.n_a, self.n_b
        prod = self.stack @ ind
        out = np.empty((self.n_mats, ind.shape[1]))
        for j, kind in enumerate(self.kinds):
            block = prod[j * n : (j + 1) * n]
            qt = np.einsum("ij,ij->j", block, ind, dtype=np.float64)
            g = prod[self.n_mats * n + j].astype(np.float64) + na * self.f_mean[j]
            s_aa = qt + 2.0 * (na - 1) * g
            a_r = (n - 2) * g + na * self.f_total[j]
            s_bb = self.t_total[j] - 2.0 * a_r + s_aa
            s_ab = a_r - s_aa
            if kind == "mmd_unbiased":
                out[j] = s_aa / (na * (na - 1)) + s_bb / (nb * (nb - 1)) - 2.0 * s_ab / (na * nb)
            elif kind == "energy":
                out[j] = 2.0 * s_ab / (na * nb) - s_aa / na**2 - s_bb / nb**2
            else:
                raise ValueError(f"unknown kernel statistic kind {kind!r}")
        return out


def run_permutations(
    n: int,
    n_a: int,
    statistics: Sequence[Callable[[np.ndarray], np.ndarray]],
    n_permutations: int,
    rng: np.random.Generator,
    chunk: int | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Evaluates statistics on the observed labelling and on the same random permutations.

    Args:
        n: pooled number of subjects (cohort A first).
        n_a: size of cohort A.
        statistics: callables mapping an ``(n, m)`` indicator to ``(k, m)`` values.
        n_permutations: number of random permutations ``B``.
        rng: random generator (consumed).
        chunk: permutations per matrix product (default from :data:`CHUNK_ELEMENTS`).

    Returns:
        ``(observed, null)``: per statistic, the observed values ``(k,)`` and null ``(k, B)``.
    """
    obs_ind = observed_indicator(n, n_a)
    observed = [np.asarray(stat(obs_ind))[:, 0] for stat in statistics]
    parts: list[list[np.ndarray]] = [[] for _ in statistics]
    for ind in subset_indicators(n, n_a, n_permutations, rng, chunk):
        for j, stat in enumerate(statistics):
            parts[j].append(np.asarray(stat(ind)))
    null = [np.concatenate(p, axis=1) for p in parts]
    return observed, null


def permutation_pvalue(observed: float, null: ArrayLike, rtol: float = TIE_RTOL) -> float:
    """One-sided ('greater') permutation p-value ``(k + 1) / (B + 1)``.

    Args:
        observed: the statistic on the real labels.
        null: the statistic under ``B`` random relabellings.
        rtol: relative tie tolerance (see :data:`TIE_RTOL`).

    Returns:
        The p-value, in ``[1/(B+1), 1]``.
    """
    null = np.asarray(null, dtype=np.float64).ravel()
    scale = max(abs(observed), float(np.median(np.abs(null))) if null.size else 0.0)
    k = int(np.count_nonzero(null >= observed - rtol * scale))
    return (k + 1) / (null.size + 1)


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of a permutation test.

    Attributes:
        statistic: the observed statistic.
        pvalue: ``(k + 1) / (B + 1)``.
        null: the ``B`` permuted statistics.
    """

    statistic: float
    pvalue: float
    null: np.ndarray


def aad_permutation_test(
    x_a: ArrayLike,
    x_b: ArrayLike,
    n_permutations: int = 10_000,
    seed: int | np.random.Generator = 0,
    chunk: int | None = None,
) -> PermutationResult:
    """Permutation test of the AAD (distance between cohort means), shuffling subjects' labels.

    Args:
        x_a: embeddings of cohort A, ``(n_a, dim)``.
        x_b: embeddings of cohort B, ``(n_b, dim)``.
        n_permutations: number of random relabellings ``B``.
        seed: seed or generator for :func:`numpy.random.default_rng`.
        chunk: permutations per matrix product.

    Returns:
        The observed AAD (float64), its p-value and the permutation null of AAD values.
    """
    a, b = check_pair(x_a, x_b)
    if n_permutations < 1:
        raise ConfigError(f"n_permutations must be >= 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    z = np.vstack([a, b])
    # Only the subspace the data span matters for norms of mean differences; when dim > n this
    # shrinks the product without changing any value.
    z = _reduce_columns(z - z.mean(axis=0))
    stat = MeanDifferenceStatistic(z, a.shape[0])
    (obs,), (null,) = run_permutations(z.shape[0], a.shape[0], [stat], n_permutations, rng, chunk)
    null_aad = np.sqrt(np.clip(null[0], 0.0, None))
    obs_aad = float(np.sqrt(max(obs[0], 0.0)))
    exact = float(np.linalg.norm(a.mean(axis=0) - b.mean(axis=0)))
    return PermutationResult(exact, permutation_pvalue(obs_aad, null_aad), null_aad)


def _reduce_columns(zc: np.ndarray) -> np.ndarray:
    """Expresses centred rows in an orthonormal basis of their span when ``dim > n``."""
    n, d = zc.shape
    if d <= n:
        return zc
    u, s, _ = np.linalg.svd(zc, full_matrices=False)
    return u * s
