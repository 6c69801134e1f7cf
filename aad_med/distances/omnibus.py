"""Stage 5, distances: one exact answer to "do these two cohorts differ at all?".

Several two-sample statistics each see a different kind of difference (the AAD a shift of the
mean feature vector, the intensity fingerprint a change of raw contrast, MMD and energy a change
of spread or shape). Reporting each with its own p-value leaves the reader to combine them, and
taking the smallest p-value uncorrected is not a valid test. The omnibus here is Pesarin's
non-parametric combination: every component is evaluated on **the same** subject-level label
permutations (one indicator matrix per chunk, :mod:`aad_med.distances.permutation`), each
component's values are turned into permutation p-values *within* its own ``B + 1`` values (the
observed labelling included), the per-labelling p-values are combined (min-p or Fisher), and the
observed combination is ranked among the ``B + 1`` combinations. Under exchangeable labels the
``B + 1`` labellings are exchangeable and the combination is a symmetric function of them, so
``p = (k + 1) / (B + 1)`` is exact whatever the dependence between the components.

Components may use different per-subject feature matrices (encoder features for the AAD, raw
intensity percentiles for the fingerprint) as long as every matrix lists the same subjects in the
same order. Pure numpy; never touches files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import check_pair
from aad_med.distances.kernels import median_heuristic, pairwise_sq_distances, rbf_kernel
from aad_med.distances.permutation import (
    TIE_RTOL,
    KernelStatistic,
    MeanDifferenceStatistic,
    _reduce_columns,
    run_permutations,
)
from aad_med.errors import ConfigError

#: Statistic kinds a component may use.
KINDS = ("mean", "mmd", "energy")

#: Ways to combine the component p-values of one labelling.
COMBINATIONS = ("min_p", "fisher")


class Component(NamedTuple):
    """One statistic of the omnibus: a kind and the two cohorts' rows it is computed on.

    Attributes:
        kind: ``"mean"`` (AAD: norm of the difference of the cohort means), ``"mmd"`` (unbiased
            MMD² with a Gaussian kernel, median-heuristic bandwidth on the pooled rows) or
            ``"energy"`` (energy distance).
        x_a: cohort A's rows ``(n_a, d)``.
        x_b: cohort B's rows ``(n_b, d)``; same subjects, same order, in every component.
        standardize: z-score every column over the pooled ``n_a + n_b`` rows first (label-free,
            so the test stays exact); for raw features on different scales (fingerprint).
    """

    kind: str
    x_a: ArrayLike
    x_b: ArrayLike
    standardize: bool = False


@dataclass(frozen=True)
class OmnibusResult:
    """Outcome of :func:`omnibus_permutation_test`.

    Attributes:
        omnibus_p: exact combined p-value ``(k + 1) / (B + 1)``.
        pvalues: each component's own permutation p-value, from the same shuffles.
        statistics: each component's observed value (AAD for ``mean``, MMD² or energy).
        driver: the component with the smallest p-value (the first listed on ties).
        combine: ``"min_p"`` or ``"fisher"``.
        n_permutations: ``B``.
    """

    omnibus_p: float
    pvalues: dict[str, float]
    statistics: dict[str, float]
    driver: str
    combine: str
    n_permutations: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (plain floats and strings)."""
        return {
            "omnibus_p": self.omnibus_p,
            "omnibus_driver": self.driver,
            "omnibus_combine": self.combine,
            "omnibus_components": dict(self.pvalues),
            "omnibus_statistics": dict(self.statistics),
            "n_permutations": self.n_permutations,
        }


def pair_seed(seed: int, a: str, b: str, stream: int = 0) -> list[int]:
    """Seed words of one pair's generator, from the cohort *names* (not their position in the
    call), so the same pair gets the same shuffles, and p-values, in any call.

    Args:
        seed: the run's non-negative seed.
        a, b: the pair's cohort names, in the pair's order.
        stream: separates generators of one pair (e.g. the main statistics and the omnibus).

    Returns:
        Seed words for :func:`numpy.random.default_rng`.
    """
    digest = hashlib.sha256(f"{a}\0{b}".encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return [int(seed), int(stream), *words]


def _zscore(z: np.ndarray) -> np.ndarray:
    mean = z.mean(axis=0)
    sd = z.std(axis=0)
    keep = sd > 1e-12 * (1.0 + np.abs(mean))
    return np.where(keep, (z - mean) / np.where(keep, sd, 1.0), 0.0)


def _pooled(components: Mapping[str, Component | tuple]) -> tuple[dict[str, tuple], int, int]:
    """Checks the components and returns ``{name: (kind, pooled rows)}``, ``n``, ``n_a``."""
    if not components:
        raise ConfigError("the omnibus test needs at least one component")
    out: dict[str, tuple] = {}
    sizes: set[tuple[int, int]] = set()
    for name, comp in components.items():
        comp = Component(*comp) if not isinstance(comp, Component) else comp
        if comp.kind not in KINDS:
            raise ConfigError(
                f"omnibus component {name!r}: unknown kind {comp.kind!r}; use {KINDS}"
            )
        a, b = check_pair(comp.x_a, comp.x_b, (f"{name}: a", f"{name}: b"))
        sizes.add((a.shape[0], b.shape[0]))
        z = np.vstack([a, b])
        out[str(name)] = (comp.kind, _zscore(z) if comp.standardize else z)
    if len(sizes) > 1:
        raise ConfigError(
            f"omnibus components must list the same subjects; cohort sizes differ: {sorted(sizes)}"
        )
    n_a, n_b = sizes.pop()
    return out, n_a + n_b, n_a


def _observed_value(kind: str, raw_obs: float) -> float:
    return float(np.sqrt(max(raw_obs, 0.0))) if kind == "mean" else float(raw_obs)


def within_pvalues(values: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """Permutation p-value of every labelling among all ``L`` labellings, per row.

    ``p[j, l] = #{l' : values[j, l'] >= values[j, l]} / L`` (larger is more extreme). Values
    within ``rtol`` times the row's median absolute value count as ties, because float32
    products give slightly different numbers for labellings that are equal in exact arithmetic.
    The rule is the same for every labelling, so it keeps the combination symmetric.

    Args:
        values: ``(n_components, L)`` statistics; column 0 is usually the observed labelling.
        rtol: relative tie tolerance.

    Returns:
        ``(n_components, L)`` p-values in ``[1/L, 1]``.
    """
    values = np.asarray(values, dtype=np.float64)
    n_lab = values.shape[1]
    out = np.empty_like(values)
    for j, row in enumerate(values):
        tol = rtol * float(np.median(np.abs(row)))
        srt = np.sort(row)
        # Count of values >= v - tol: everything from the first index not below v - tol.
        out[j] = (n_lab - np.searchsorted(srt, row - tol, side="left")) / n_lab
    return out


def combine_pvalues(p: np.ndarray, combine: str) -> np.ndarray:
    """Combination statistic per labelling, oriented so that larger is more extreme.

    Args:
        p: ``(n_components, L)`` within-permutation p-values.
        combine: ``"min_p"`` (``-min_j p_j``) or ``"fisher"`` (``-Σ_j log p_j``).

    Returns:
        ``(L,)`` combined values.
    """
    if combine == "min_p":
        return -p.min(axis=0)
    if combine == "fisher":
        return -np.log(p).sum(axis=0)
    raise ConfigError(f"unknown omnibus combination {combine!r}; use one of {COMBINATIONS}")


def omnibus_permutation_test(
    components: Mapping[str, Component | tuple],
    n_permutations: int = 9_999,
    seed: int | np.random.Generator = 0,
    combine: str = "min_p",
    chunk: int | None = None,
) -> OmnibusResult:
    """Exact combined permutation test of several two-sample statistics.

    Args:
        components: ``{name: Component(kind, x_a, x_b[, standardize])}`` (plain tuples are
            accepted); every component lists the same subjects in the same order.
        n_permutations: number of random subject-level relabellings ``B``.
        seed: seed or generator for :func:`numpy.random.default_rng`.
        combine: ``"min_p"`` (reacts to the single strongest component) or ``"fisher"``
            (accumulates moderate evidence from several).
        chunk: permutations per matrix product.

    Returns:
        The omnibus p-value, each component's p-value and observed statistic, and the driver.

    Raises:
        ConfigError: no component, unknown kind or combination, cohorts of different sizes
            across components, or the checks of :func:`aad_med.distances._common.check_pair`.
    """
    if n_permutations < 1:
        raise ConfigError(f"n_permutations must be >= 1, got {n_permutations}")
    if combine not in COMBINATIONS:
        raise ConfigError(f"unknown omnibus combination {combine!r}; use one of {COMBINATIONS}")
    pooled, n, n_a = _pooled(components)
    names = list(pooled)
    statistics, where = [], []
    means = [k for k in names if pooled[k][0] == "mean"]
    if means:
        # One product serves every mean-based component: their reduced columns side by side.
        cols, blocks, start = [], [], 0
        for k in means:
            z = _reduce_columns(pooled[k][1] - pooled[k][1].mean(axis=0))
            cols.append(z)
            blocks.append(slice(start, start + z.shape[1]))
            start += z.shape[1]
        statistics.append(MeanDifferenceStatistic(np.hstack(cols), n_a, blocks))
        where += [(k, len(statistics) - 1, i) for i, k in enumerate(means)]
    kernels = [k for k in names if pooled[k][0] != "mean"]
    if kernels:
        mats, kinds = [], []
        for k in kernels:
            kind, z = pooled[k]
            d2 = pairwise_sq_distances(z)
            if kind == "mmd":
                mats.append(rbf_kernel(d2, median_heuristic(d2)))
                kinds.append("mmd_unbiased")
            else:
                mats.append(np.sqrt(d2))
                kinds.append("energy")
        statistics.append(KernelStatistic(mats, kinds, n_a))
        where += [(k, len(statistics) - 1, i) for i, k in enumerate(kernels)]
    rng = np.random.default_rng(seed)
    observed, null = run_permutations(n, n_a, statistics, n_permutations, rng, chunk)
    order = {k: (s, i) for k, s, i in where}
    values = np.stack(
        [np.concatenate([[observed[s][i]], null[s][i]]) for s, i in (order[k] for k in names)]
    )
    p_all = within_pvalues(values)
    combined = combine_pvalues(p_all, combine)
    # Ties of the combination (e.g. two labellings both with min-p 1/(B+1)) count against us.
    tol = 1e-9 * max(1.0, abs(float(combined[0])))
    k_ge = int(np.count_nonzero(combined[1:] >= combined[0] - tol))
    pvals = {k: float(p_all[j, 0]) for j, k in enumerate(names)}
    stats = {k: _observed_value(pooled[k][0], float(values[j, 0])) for j, k in enumerate(names)}
    driver = min(names, key=lambda k: pvals[k])
    return OmnibusResult(
        omnibus_p=(k_ge + 1) / (n_permutations + 1),
        pvalues=pvals,
        statistics=stats,
        driver=driver,
        combine=combine,
        n_permutations=int(n_permutations),
    )


def default_components(
    features_a: ArrayLike,
    features_b: ArrayLike,
    fingerprint_a: ArrayLike | None = None,
    fingerprint_b: ArrayLike | None = None,
) -> dict[str, Component]:
    """The report's omnibus: AAD, MMD and energy on the AAD features, plus the fingerprint.

    Args:
        features_a: cohort A's finalised AAD feature vectors (already standardised by the
            feature set).
        features_b: cohort B's, same columns.
        fingerprint_a: cohort A's raw intensity fingerprint (per-channel foreground
            percentiles); standardised over the pooled subjects here. ``None`` leaves it out.
        fingerprint_b: cohort B's.

    Returns:
        ``{"aad", "mmd", "energy"[, "fingerprint"]}`` components.
    """
    comps = {
        "aad": Component("mean", features_a, features_b),
        "mmd": Component("mmd", features_a, features_b),
        "energy": Component("energy", features_a, features_b),
    }
    if (fingerprint_a is None) != (fingerprint_b is None):
        raise ConfigError("the fingerprint component needs both cohorts' fingerprints")
    if fingerprint_a is not None:
        comps["fingerprint"] = Component("mean", fingerprint_a, fingerprint_b, standardize=True)
    return comps


__all__ = [
    "COMBINATIONS",
    "KINDS",
    "Component",
    "OmnibusResult",
    "combine_pvalues",
    "default_components",
    "omnibus_permutation_test",
    "pair_seed",
    "within_pvalues",
]
