"""Stage 5, distances: combine the comparisons made with several encoders (e.g. the same
training recipe with seeds 0..4) into one AAD per pair with an interval that includes
encoder-to-encoder variation, and measure how stable the ranking of pairs is across encoders.
Pure numpy/scipy on ``compare_embeddings`` outputs; never touches files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats

from aad_med.distances._common import to_jsonable
from aad_med.distances.interval import DistanceMoments, interval_from_moments
from aad_med.errors import ConfigError

#: How the combined interval is built, by method name (also written to the output).
INTERVAL_METHODS = {
    "unbiased_total_variance": "The single-run interval (aad_ci95, test inversion for the "
    "unbiased squared distance) applied to the encoders' mean aad2_unbiased, with variance = "
    "mean within-encoder variance + between-encoder variance of aad2_unbiased, widened by "
    "(t/z)² with Welch–Satterthwaite degrees of freedom (E - 1 for the between part): the "
    "spread of the distance one would get from another encoder of the same recipe on another "
    "sample of subjects.",
    "t_total_variance": "For results written before aad2_moments existed: mean AAD ± "
    "t(0.975, E-1) × sqrt(mean within-encoder variance + between-encoder variance), clipped at "
    "0, the within variance taken from each encoder's 95% interval ((hi - lo) / 3.92)². "
    "Inherits the upward bias of AAD.",
}


def combine_encoder_runs(
    results: Sequence[Mapping[str, Any]],
    names: Sequence[str] | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """Combines ``compare_embeddings`` results obtained with different encoders.

    Args:
        results: one ``compare_embeddings`` output per encoder, over the same cohorts (pairs
            without ``aad2_moments``, from older runs, get the fallback interval of
            :data:`INTERVAL_METHODS`).
        names: encoder labels (default: each result's ``checkpoint`` key, else ``encoder{i}``).
        level: coverage of the combined interval.

    Returns:
        JSON-safe dict: ``encoders``, ``n_encoders``, ``pairs`` (per cohort pair: ``a``, ``b``,
        ``aad_per_encoder``, ``aad_mean``, ``aad_unbiased_mean`` (sqrt of the mean
        aad2_unbiased), ``aad_interval`` [lo, hi] for the distance between the population
        means, ``aad_interval_method``, ``within_encoder_var`` and ``between_encoder_var`` (of
        aad2_unbiased, or of AAD for the fallback), ``aad_null_ratio_per_encoder``,
        ``aad_null_ratio_mean``, ``aad_p_per_encoder``, ``n_encoders_significant`` at each
        result's ``alpha`` on ``aad_p_fdr``), ``rank_stability`` (``spearman_mean`` over encoder
        pairs of the Spearman correlation of the pairwise-AAD ordering, ``None`` with fewer than
        3 cohort pairs; ``spearman_pairs`` [[i, j, rho], ...]) and ``methods``.

    Raises:
        ConfigError: fewer than 2 results, or results over different cohort pairs.
    """
    if len(results) < 2:
        raise ConfigError("combining encoders needs the results of at least 2 encoders")
    if names is None:
        names = [str(r.get("checkpoint", f"encoder{i}")) for i, r in enumerate(results)]
    elif len(names) != len(results):
        raise ConfigError(f"{len(names)} encoder names for {len(results)} results")
    keys = [(p["a"], p["b"]) for p in results[0]["pairs"]]
    by_key: list[dict[tuple[str, str], Mapping[str, Any]]] = []
    for name, res in zip(names, results, strict=True):
        pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
        if set(pairs) != set(keys):
            raise ConfigError(
                f"encoder '{name}' compared other cohort pairs ({sorted(pairs)}) than "
                f"'{names[0]}' ({sorted(keys)})"
            )
        by_key.append(pairs)
    n_enc = len(results)
    q_hi = (1 + level) / 2

    out_pairs = []
    for key in keys:
        runs = [pairs[key] for pairs in by_key]
        aads = np.array([r["aad"] for r in runs], dtype=np.float64)
        u_mean = None
        if all(r.get("aad2_moments") is not None for r in runs):
            u = np.array([r["aad2_unbiased"] for r in runs], dtype=np.float64)
            # JSON writes an infinite df (no linear variance) as null.
            m = {
                k: np.array([np.inf if r["aad2_moments"][k] is None else r["aad2_moments"][k]
                             for r in runs], dtype=np.float64)
                for k in ("var_null", "var_linear", "trace", "df_linear")
            }  # fmt: skip
            within = float(np.mean(m["var_null"] + m["var_linear"]))
            between = float(u.var(ddof=1))
            # Satterthwaite: the between-encoder variance has only E - 1 df, so the whole
            # variance is widened by the squared ratio of t to normal quantiles.
            total = within + between
            widen = 1.0
            if between > 0:
                df = total**2 / (between**2 / (n_enc - 1))
                widen = float(stats.t.ppf(q_hi, df) / stats.norm.ppf(q_hi)) ** 2
            u_mean = float(u.mean())
            lo, hi = interval_from_moments(
                DistanceMoments(
                    u=u_mean,
                    var_null=widen * (float(m["var_null"].mean()) + between),
                    var_linear=widen * float(m["var_linear"].mean()),
                    trace=float(m["trace"].mean()),
                    df_linear=float(m["df_linear"].min()),
                ),
                level,
            )
            interval = [float(lo[0]), float(hi[0])]
            method = "unbiased_total_variance"
        else:
            within = float(
                np.mean([((r["aad_ci95"][1] - r["aad_ci95"][0]) / 3.92) ** 2 for r in runs])
            )
            between = float(aads.var(ddof=1))
            half = stats.t.ppf(q_hi, n_enc - 1) * np.sqrt(within + between)
            # AAD is a norm: an interval below 0 says nothing more than 0 does.
            interval = [max(float(aads.mean() - half), 0.0), float(aads.mean() + half)]
            method = "t_total_variance"
        ratios = [r.get("aad_null_ratio") for r in runs]
        finite_ratios = [x for x in ratios if x is not None]
        alphas = [res.get("alpha", 0.05) for res in results]
        out_pairs.append(
            {
                "a": key[0],
                "b": key[1],
                "aad_per_encoder": aads,
                "aad_mean": float(aads.mean()),
                "aad_unbiased_mean": None if u_mean is None else float(np.sqrt(max(u_mean, 0.0))),
                "aad_interval": interval,
                "aad_interval_method": method,
                "within_encoder_var": within,
                "between_encoder_var": between,
                "aad_null_ratio_per_encoder": ratios,
                "aad_null_ratio_mean": float(np.mean(finite_ratios)) if finite_ratios else None,
                "aad_p_per_encoder": [r.get("aad_p") for r in runs],
                "n_encoders_significant": int(
                    sum(
                        r.get("aad_p_fdr") is not None and r["aad_p_fdr"] < al
                        for r, al in zip(runs, alphas, strict=True)
                    )
                ),
            }
        )

    rhos = []
    if len(keys) >= 3:
        vectors = [np.array([pairs[k]["aad"] for k in keys]) for pairs in by_key]
        for i, j in combinations(range(n_enc), 2):
            rho = stats.spearmanr(vectors[i], vectors[j]).statistic
            rhos.append([i, j, float(rho) if np.isfinite(rho) else None])
    valid = [r[2] for r in rhos if r[2] is not None]
    return to_jsonable(
        {
            "encoders": list(names),
            "n_encoders": n_enc,
            "level": level,
            "pairs": out_pairs,
            "rank_stability": {
                "spearman_mean": float(np.mean(valid)) if valid else None,
                "spearman_pairs": rhos,
                "n_cohort_pairs": len(keys),
            },
            "methods": dict(INTERVAL_METHODS),
        }
    )
