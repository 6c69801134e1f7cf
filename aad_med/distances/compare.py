"""Stage 5, distances: compare k cohorts' embeddings — every pair's AAD with its permutation
p-value, confidence interval, bias-corrected estimate, null reference, effect size,
complementary tests and attribution, plus the k-cohort views (FDR across pairs, pairwise
matrix, MDS, dendrogram).

Returns the statistical part of ``distances.json`` as plain Python numbers (JSON-safe, no NaN);
what each key means, in words, lives in :mod:`aad_med.report.text` (``DEFINITIONS``). Pure
numpy/scipy; never touches files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import as_cohort_array, to_jsonable
from aad_med.distances.aad import (
    aad,
    aad2_unbiased,
    aad_unbiased,
    dimension_shares,
    mean_difference,
)
from aad_med.distances.bootstrap import bootstrap_means, percentile_interval
from aad_med.distances.frechet import frechet_distance
from aad_med.distances.hotelling import hotelling_test, label_free_whitened, standardized_distance
from aad_med.distances.interval import distance_moments, interval_from_moments
from aad_med.distances.kernels import (
    energy_from_distances,
    median_heuristic,
    mmd2_from_kernel,
    pairwise_sq_distances,
    rbf_kernel,
)
from aad_med.distances.multi import average_linkage, classical_mds
from aad_med.distances.omnibus import pair_seed
from aad_med.distances.permutation import (
    KernelStatistic,
    MeanDifferenceStatistic,
    _reduce_columns,
    permutation_pvalue,
    run_permutations,
)
from aad_med.distances.univariate import akld, bh_fdr, ks_per_dimension
from aad_med.errors import ConfigError

#: Statistics ``tests=`` may select; AAD (with p, CI and null ratio) and attribution always run.
ALL_TESTS: tuple[str, ...] = (
    "aad",
    "standardized",
    "hotelling",
    "mmd",
    "energy",
    "frechet",
    "ks",
    "akld",
)

#: Permutation AAD values kept per pair for plotting the null distribution.
NULL_SAMPLE_SIZE = 2000


def _check_tests(tests: Sequence[str] | None) -> tuple[str, ...]:
    if tests is None:
        return ALL_TESTS
    if isinstance(tests, str):
        tests = (tests,)
    unknown = [t for t in tests if t not in ALL_TESTS]
    if unknown:
        raise ConfigError(
            f"unknown statistic(s) {', '.join(map(repr, unknown))} in tests; "
            f"choose from {', '.join(ALL_TESTS)}"
        )
    return tuple(t for t in ALL_TESTS if t == "aad" or t in tests)


def _check_cohorts(embeddings: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
    if not isinstance(embeddings, Mapping) or len(embeddings) < 2:
        raise ConfigError("comparing cohorts needs at least 2 cohorts (a mapping name -> array)")
    cohorts = {str(k): as_cohort_array(v, str(k)) for k, v in embeddings.items()}
    dims = {k: v.shape[1] for k, v in cohorts.items()}
    if len(set(dims.values())) > 1:
        listing = ", ".join(f"'{k}': {d}" for k, d in dims.items())
        raise ConfigError(f"cohorts have different embedding dimensions ({listing})")
    return cohorts


def _compare_pair(
    a: np.ndarray,
    b: np.ndarray,
    boot_a: np.ndarray,
    boot_b: np.ndarray,
    tests: tuple[str, ...],
    n_permutations: int,
    rng: np.random.Generator,
    alpha: float,
    return_samples: bool,
) -> dict[str, Any]:
    na, nb = a.shape[0], b.shape[0]
    n = na + nb
    delta = mean_difference(a, b)
    aad_value = aad(a, b)
    moments = distance_moments(a, b)
    lo, hi = interval_from_moments(moments)

    pooled = np.vstack([a, b])
    reduced = _reduce_columns(pooled - pooled.mean(axis=0))
    r = reduced.shape[1]
    blocks = [slice(0, r)]
    z = reduced
    std = standardized_distance(a, b) if "standardized" in tests else None
    t2 = hot_p = hot_method = hot_cov = None
    if "hotelling" in tests:
        hot = hotelling_test(a, b)
        t2, hot_p, hot_cov = hot.t2, hot.pvalue, hot.covariance
        hot_method = "F" if hot_p is not None else None
    perm_hotelling = "hotelling" in tests and hot_p is None
    if perm_hotelling:
        white = label_free_whitened(pooled)
        z = np.hstack([reduced, white])
        blocks.append(slice(r, r + white.shape[1]))
    statistics: list = [MeanDifferenceStatistic(z, na, blocks)]
    mats, kinds = [], []
    bandwidth = None
    if "mmd" in tests or "energy" in tests:
        d2 = pairwise_sq_distances(pooled)
        if "mmd" in tests:
            bandwidth = median_heuristic(d2)
            mats.append(rbf_kernel(d2, bandwidth))
            kinds.append("mmd_unbiased")
        if "energy" in tests:
            mats.append(np.sqrt(d2))
            kinds.append("energy")
        statistics.append(KernelStatistic(mats, kinds, na))
    observed, null = run_permutations(n, na, statistics, n_permutations, rng)

    null_aad = np.sqrt(np.clip(null[0][0], 0.0, None))
    aad_p = permutation_pvalue(float(np.sqrt(max(observed[0][0], 0.0))), null_aad)
    null_median = float(np.median(null_aad))
    if perm_hotelling:
        hot_p = permutation_pvalue(float(observed[0][1]), null[0][1])
        hot_method = "permutation"

    kernel_values: dict[str, tuple[float | None, float | None]] = {}
    for j, kind in enumerate(kinds):
        value = (
            mmd2_from_kernel(mats[j], na)
            if kind == "mmd_unbiased"
            else energy_from_distances(mats[j], na)
        )
        kernel_values[kind] = (value, permutation_pvalue(float(observed[1][j]), null[1][j]))

    ks_q = ks_dims = None
    if "ks" in tests:
        _, _, q = ks_per_dimension(a, b)
        ks_q = q
        ks_dims = [int(j) for j in np.flatnonzero(q < alpha)]

    pair: dict[str, Any] = {
        "n_a": na,
        "n_b": nb,
        "aad": aad_value,
        "aad_unbiased": aad_unbiased(a, b),
        "aad2_unbiased": aad2_unbiased(a, b),
        "aad2_unbiased_se": float(moments.se),
        "aad2_moments": {
            "var_null": float(moments.var_null),
            "var_linear": float(moments.var_linear),
            "trace": float(moments.trace),
            "df_linear": float(moments.df_linear),
        },
        "aad_ci95": [float(lo[0]), float(hi[0])],
        "aad_p": aad_p,
        "aad_p_fdr": None,
        "n_permutations": n_permutations,
        "aad_null_median": null_median,
        "aad_null_ratio": aad_value / null_median if null_median > 0 else None,
        "aad_standardized": std,
        "hotelling_t2": t2,
        "hotelling_p": hot_p,
        "hotelling_p_method": hot_method,
        "hotelling_covariance": hot_cov,
        "mmd2": kernel_values.get("mmd_unbiased", (None, None))[0],
        "mmd_p": kernel_values.get("mmd_unbiased", (None, None))[1],
        "mmd_bandwidth": bandwidth,
        "energy": kernel_values.get("energy", (None, None))[0],
        "energy_p": kernel_values.get("energy", (None, None))[1],
        "frechet": frechet_distance(a, b) if "frechet" in tests else None,
        "akld": akld(a, b) if "akld" in tests else None,
        "ks_dims_fdr": ks_dims,
        "ks_q": ks_q,
        "top_dims": [[j, s] for j, s in dimension_shares(delta)],
        "null_aad_sample": null_aad[:NULL_SAMPLE_SIZE],
    }
    if return_samples:
        pair["aad_bootstrap_sample"] = np.linalg.norm(boot_a - boot_b, axis=1)
    return pair


def compare_embeddings(
    embeddings: Mapping[str, ArrayLike],
    n_permutations: int = 10_000,
    n_bootstrap: int = 2000,
    seed: int = 0,
    tests: Sequence[str] | None = None,
    alpha: float = 0.05,
    return_samples: bool = False,
) -> dict[str, Any]:
    """Compares every pair of cohorts with AAD and its statistics.

    Args:
        embeddings: cohort name -> ``(n_subjects, dim)`` array (one row per subject); at least
            2 cohorts with at least 2 subjects each and one shared ``dim``.
        n_permutations: label shuffles per pair (the same shuffles serve every statistic).
        n_bootstrap: subject resamples per cohort for the per-dimension bands of each
            cohort's mean (``aad_ci95`` is analytic, see :mod:`aad_med.distances.interval`).
        seed: non-negative integer; the same seed gives the same numbers.
        tests: statistics beyond AAD, from :data:`ALL_TESTS` (``("aad",)`` for AAD with its
            p-value, interval and null ratio only; ``None`` for all). Attribution always runs.
            Statistics not selected are ``None`` in the output.
        alpha: significance level for the FDR-selected KS dimensions.
        return_samples: also return each pair's bootstrap AAD values as
            ``aad_bootstrap_sample`` (percentiles of these are the old, biased interval; kept
            for plots, no longer used by :func:`combine_encoder_runs`).

    Returns:
        JSON-safe dict: ``cohorts`` (n_subjects, mean and its per-dimension bootstrap 95%
        interval), ``pairs`` (one dict per pair: ``a``, ``b``, ``n_a``, ``n_b``, ``aad``,
        ``aad_unbiased``, ``aad2_unbiased``, ``aad2_unbiased_se``, ``aad_ci95``, ``aad_p``,
        ``aad_p_fdr``, ``n_permutations``, ``aad_null_median``, ``aad_null_ratio``,
        ``aad_standardized``, ``hotelling_t2``, ``hotelling_p``, ``hotelling_p_method``,
        ``hotelling_covariance``, ``mmd2``, ``mmd_p``, ``mmd_bandwidth``, ``energy``,
        ``energy_p``, ``frechet``, ``akld``, ``ks_dims_fdr``, ``ks_q``, ``top_dims``,
        ``null_aad_sample``; meanings in ``aad_med.report.text.DEFINITIONS``),
        ``pairwise_aad``, ``mds``, ``dendrogram``, ``tests``, ``seed``, ``alpha``, ``dim``.

    Raises:
        ConfigError: fewer than 2 cohorts, a cohort with fewer than 2 subjects, differing
            dimensions, non-finite values, unknown test names or invalid counts.
    """
    selected = _check_tests(tests)
    cohorts = _check_cohorts(embeddings)
    if int(n_permutations) < 1:
        raise ConfigError(f"n_permutations must be >= 1, got {n_permutations}")
    if int(n_bootstrap) < 1:
        raise ConfigError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")
    n_permutations, n_bootstrap, seed = int(n_permutations), int(n_bootstrap), int(seed)
    names = list(cohorts)
    dim = cohorts[names[0]].shape[1]

    boots: dict[str, np.ndarray] = {}
    cohort_out: dict[str, Any] = {}
    for name in names:
        x = cohorts[name]
        # Generators seeded by names, not positions: a cohort or pair gets the same draws in
        # any call (the fixed feature scale makes its vectors the same too).
        rng = np.random.default_rng(pair_seed(seed, name, "", 0))
        boots[name] = bootstrap_means(x, n_bootstrap, rng, name)
        lo, hi = percentile_interval(boots[name])
        cohort_out[name] = {
            "n_subjects": x.shape[0],
            "mean": x.mean(axis=0),
            "mean_ci95_lo": lo,
            "mean_ci95_hi": hi,
        }

    pairs = []
    matrix = np.zeros((len(names), len(names)))
    for i, j in combinations(range(len(names)), 2):
        a, b = names[i], names[j]
        pair = {"a": a, "b": b}
        pair.update(
            _compare_pair(
                cohorts[a],
                cohorts[b],
                boots[a],
                boots[b],
                selected,
                n_permutations,
                np.random.default_rng(pair_seed(seed, a, b, 1)),
                alpha,
                return_samples,
            )
        )
        matrix[i, j] = matrix[j, i] = pair["aad"]
        pairs.append(pair)

    fdr = bh_fdr([p["aad_p"] for p in pairs])
    for pair, q in zip(pairs, fdr, strict=True):
        pair["aad_p_fdr"] = float(q)

    used = ("aad", *[t for t in selected if t != "aad"])
    result = {
        "cohorts": cohort_out,
        "pairs": pairs,
        "pairwise_aad": {"names": names, "matrix": matrix},
        "mds": {"names": names, "coords": classical_mds(matrix)},
        "dendrogram": {"names": names, "linkage": average_linkage(matrix)},
        "tests": list(used),
        "seed": seed,
        "alpha": alpha,
        "dim": dim,
    }
    return to_jsonable(result)
