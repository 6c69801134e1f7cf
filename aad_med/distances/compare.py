"""Stage 5, distances: compare k cohorts' embeddings — every pair's AAD with its permutation
p-value, bootstrap interval, null reference, effect size, complementary tests and attribution,
plus the k-cohort views (FDR across pairs, pairwise matrix, MDS, dendrogram).

Returns the statistical part of ``distances.json`` as plain Python (JSON-safe, no NaN). Pure
numpy/scipy; never touches files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from aad_med.distances._common import as_cohort_array, to_jsonable
from aad_med.distances.aad import dimension_shares
from aad_med.distances.bootstrap import bootstrap_means, percentile_interval
from aad_med.distances.frechet import frechet_distance
from aad_med.distances.hotelling import aad_standardized, hotelling_test, label_free_whitened
from aad_med.distances.kernels import (
    energy_from_distances,
    median_heuristic,
    mmd2_from_kernel,
    pairwise_sq_distances,
    rbf_kernel,
)
from aad_med.distances.multi import average_linkage, classical_mds
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

#: One sentence per reported statistic (shown in reports next to the numbers).
DEFINITIONS: dict[str, str] = {
    "aad": "Autoencoder Average Distance: Euclidean distance between the two cohorts' mean "
    "embedding vectors (every subject weighs the same).",
    "aad2_unbiased": "Unbiased estimate of the squared distance between the population means "
    "(||Δ||² − tr Σ_A/n_A − tr Σ_B/n_B); near 0, possibly negative, when the means are equal; "
    "equals the unbiased linear-kernel MMD².",
    "aad_ci95": "95% percentile bootstrap interval of AAD, resampling subjects within each "
    "cohort; AAD is biased upwards in small cohorts, so the interval does not reach 0 and can "
    "lie above the observed AAD when cohorts are small and alike (read aad_p for that).",
    "aad_p": "Permutation p-value of AAD: share of random cohort-label shuffles (plus the "
    "observed labelling) whose AAD is at least the observed one, (k+1)/(B+1).",
    "aad_p_fdr": "aad_p adjusted by Benjamini–Hochberg across all cohort pairs.",
    "aad_null_median": "Median AAD under label shuffles: the AAD two cohorts of these sizes show "
    "by chance alone.",
    "aad_null_ratio": "AAD divided by aad_null_median: about 1 for no difference; a scale-free "
    "reading of how far above chance the distance is.",
    "aad_standardized": "Mahalanobis distance between the cohort means with the pooled "
    "within-cohort covariance (Ledoit–Wolf shrinkage of its correlation): the mean shift in "
    "units of within-cohort spread, unchanged when a dimension is rescaled.",
    "hotelling_t2": "Hotelling's two-sample T²: with more subjects than dimensions the textbook "
    "test (plain pooled covariance, hotelling_p from the F distribution, exact under "
    "normality); otherwise with the Ledoit–Wolf pooled covariance and hotelling_p from label "
    "permutations (of T² with a label-free Ledoit–Wolf covariance, so the test stays exact).",
    "mmd2": "Unbiased squared maximum mean discrepancy with a Gaussian kernel (median pairwise "
    "distance as bandwidth): sensitive to any difference in distribution, not only the mean.",
    "energy": "Energy distance 2E|A−B| − E|A−A'| − E|B−B'|: zero only for identical "
    "distributions; sees differences in spread and shape that AAD cannot.",
    "frechet": "Fréchet distance between Gaussian fits (means and Ledoit–Wolf covariances), "
    "as in FID: mean shift plus covariance difference.",
    "akld": "McCaffrey's autoencoded KL divergence: symmetric KL between per-dimension "
    "10-bin histograms on shared bins, averaged over dimensions.",
    "ks_dims_fdr": "Latent dimensions whose two-sample Kolmogorov–Smirnov test stays "
    "significant after Benjamini–Hochberg correction across dimensions.",
    "top_dims": "Every latent dimension with its share of AAD², (Δμ_j)²/AAD², largest first.",
    "null_aad_sample": "A random sample of AAD values under label shuffles (for plotting).",
}


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


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _fmt_p(p: float | None, n_perm: int) -> str:
    if p is None:
        return "n/a"
    if p <= 1.0 / (n_perm + 1) + 1e-15:
        return f"p ≤ {_fmt(p, 2)} (no shuffle out of {n_perm} reached the observed AAD)"
    return f"p = {_fmt(p, 2)}"


def interpret_pair(pair: Mapping[str, Any], alpha: float, n_pairs: int) -> str:
    """A plain-language reading of one pair's numbers, including what AAD cannot see."""
    a, b = pair["a"], pair["b"]
    lo, hi = pair["aad_ci95"]
    p_used = pair["aad_p_fdr"] if n_pairs > 1 else pair["aad_p"]
    parts = [f"{a} vs {b}: AAD {_fmt(pair['aad'])} [95% CI {_fmt(lo)}, {_fmt(hi)}]"]
    ratio = pair["aad_null_ratio"]
    if ratio is not None:
        parts[0] += (
            f" is {_fmt(ratio, 2)}x the AAD expected from label shuffles alone "
            f"({_fmt(pair['aad_null_median'])})"
        )
    parts[0] += ";"
    p_text = f"permutation {_fmt_p(pair['aad_p'], pair['n_permutations'])}"
    if n_pairs > 1:
        p_text += f", FDR-adjusted across {n_pairs} pairs {_fmt(pair['aad_p_fdr'], 2)}"
    if p_used is not None and p_used < alpha:
        verdict = f"the cohort means differ ({p_text})."
    else:
        verdict = f"no evidence at α = {alpha:g} that the cohort means differ ({p_text})."
    parts.append(verdict)
    std = pair.get("aad_standardized")
    if std is not None:
        parts.append(
            f"In within-cohort units the means are {_fmt(std, 2)} pooled standard deviations "
            "apart (Mahalanobis)."
        )
    extra = []
    for key, label in (("energy_p", "energy"), ("mmd_p", "MMD")):
        if pair.get(key) is not None:
            extra.append(f"{label} p = {_fmt(pair[key], 2)}")
    blind = (
        "AAD compares only the means: cohorts with equal means but different spread or shape "
        "look identical to it"
    )
    if extra:
        dist_sig = any(pair[k] is not None and pair[k] < alpha for k in ("energy_p", "mmd_p"))
        mean_sig = p_used is not None and p_used < alpha
        if dist_sig and not mean_sig:
            blind += (
                f"; here the whole distributions do differ ({', '.join(extra)}), "
                "so look beyond the means"
            )
        elif dist_sig:
            blind += f"; the distribution tests agree ({', '.join(extra)})"
        else:
            blind += f"; the distribution tests see no difference either ({', '.join(extra)})"
    else:
        blind += "; run the energy or MMD tests to check spread and shape"
    parts.append(blind + ".")
    return " ".join(parts)


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
    delta = a.mean(axis=0) - b.mean(axis=0)
    aad_value = float(np.linalg.norm(delta))
    tr_a = float(np.sum(a.var(axis=0, ddof=1)))
    tr_b = float(np.sum(b.var(axis=0, ddof=1)))
    boot_aad = np.linalg.norm(boot_a - boot_b, axis=1)
    lo, hi = percentile_interval(boot_aad)

    pooled = np.vstack([a, b])
    reduced = _reduce_columns(pooled - pooled.mean(axis=0))
    r = reduced.shape[1]
    blocks = [slice(0, r)]
    z = reduced
    std = aad_standardized(a, b) if "standardized" in tests else None
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
        "aad2_unbiased": float(delta @ delta - tr_a / na - tr_b / nb),
        "aad_ci95": [float(lo), float(hi)],
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
        pair["aad_bootstrap_sample"] = boot_aad
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
        n_bootstrap: subject resamples per cohort for the intervals.
        seed: non-negative integer; the same seed gives the same numbers.
        tests: statistics beyond AAD, from :data:`ALL_TESTS` (``("aad",)`` for AAD with its
            p-value, interval and null ratio only; ``None`` for all). Attribution always runs.
            Statistics not selected are ``None`` in the output.
        alpha: significance level for the FDR-selected KS dimensions and the interpretation.
        return_samples: also return each pair's bootstrap AAD values as
            ``aad_bootstrap_sample`` (needed by :func:`combine_encoder_runs`).

    Returns:
        JSON-safe dict: ``cohorts`` (n_subjects, mean and its per-dimension bootstrap 95%
        interval), ``pairs`` (one dict per pair, keys as in :data:`DEFINITIONS` plus ``a``,
        ``b``, ``n_a``, ``n_b``, ``n_permutations``, ``hotelling_p_method``, ``mmd_bandwidth``,
        ``ks_q``, ``interpretation``), ``pairwise_aad``, ``mds``, ``dendrogram``, ``tests``,
        ``seed``, ``alpha``, ``dim``, ``definitions``.

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
    for i, name in enumerate(names):
        x = cohorts[name]
        boots[name] = bootstrap_means(x, n_bootstrap, np.random.default_rng([seed, 0, i]), name)
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
                np.random.default_rng([seed, 1, i, j]),
                alpha,
                return_samples,
            )
        )
        matrix[i, j] = matrix[j, i] = pair["aad"]
        pairs.append(pair)

    fdr = bh_fdr([p["aad_p"] for p in pairs])
    for pair, q in zip(pairs, fdr, strict=True):
        pair["aad_p_fdr"] = float(q)
    for pair in pairs:
        pair["interpretation"] = interpret_pair(to_jsonable(pair), alpha, len(pairs))

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
        "definitions": dict(DEFINITIONS),
    }
    return to_jsonable(result)
