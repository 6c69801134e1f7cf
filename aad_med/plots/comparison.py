"""Figures of a comparison (``aad-compare``): latent means, PCA, null distributions, pairwise
AAD, MDS, dendrogram and attribution, drawn headless from a comparison result.

Stage: plots. Reads nothing from disk and computes no statistic beyond the mean bands drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from aad_med.embedding.encode import CohortEmbedding


def comparison_figures(
    out_dir: Path,
    embs: Mapping[str, CohortEmbedding],
    result: Mapping,
    bands_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Path]:
    """Draw every figure of a comparison into ``out_dir / "plots"``.

    Args:
        out_dir: the (staging) run folder; paths returned are relative to it.
        embs: ``{cohort: CohortEmbedding}`` in comparison order.
        result: the comparison result (``pairs``, ``pairwise_aad``, ``mds``, ``dendrogram``,
            ``features``).
        bands_bootstrap: bootstrap resamples of the mean bands in ``latent_means.png``.
        seed: seed of those resamples.

    Returns:
        ``{figure key: path relative to out_dir}`` (the report's image list).
    """
    from aad_med.plots.latent import plot_attribution, plot_latent_means, plot_latent_pca
    from aad_med.plots.statistics import (
        plot_dendrogram,
        plot_mds,
        plot_null_distribution,
        plot_pairwise_aad,
    )
    from aad_med.plots.summaries import bootstrap_mean_bands

    plots = out_dir / "plots"
    names = list(embs)
    pairs = result["pairs"]
    means = {n: e.latent_means.mean(axis=0) for n, e in embs.items()}
    bands = {
        n: bootstrap_mean_bands(e.latent_means, bands_bootstrap, seed) for n, e in embs.items()
    }
    # Order dimensions by the pair that differs most beyond chance: with several cohorts the
    # first pair is often a same-site one, whose shares are noise.
    ratio = "latent_aad_null_ratio" if "latent_aad_null_ratio" in pairs[0] else "aad_null_ratio"
    first = max(pairs, key=lambda p: p.get(ratio) or 0.0)
    delta = means[first["b"]] - means[first["a"]]
    total = float(delta @ delta)
    shares = delta**2 / total if total > 0 else np.zeros_like(delta)
    vectors = {n: e.vectors for n, e in embs.items()}
    space = "latent" if result["features"] == "latent" else f"{result['features']} feature"
    out = {
        "latent_means": plot_latent_means(
            means,
            bands,
            plots / "latent_means.png",
            shares,
            shares_label=f"share of latent AAD²\n({first['a']} vs {first['b']})",
        ),
        "latent_pca": plot_latent_pca(
            vectors,
            plots / "latent_pca.png",
            title=f"Subjects' {space} vectors (PCA); × = cohort mean, ellipse = 95%",
        ),
        "null_distribution": plot_null_distribution(pairs, plots / "null_distribution.png"),
        "pairwise_aad": plot_pairwise_aad(
            names, np.asarray(result["pairwise_aad"]["matrix"]), plots / "pairwise_aad.png"
        ),
        "mds": plot_mds(
            result["mds"]["names"], np.asarray(result["mds"]["coords"]), plots / "mds.png"
        ),
        "dendrogram": plot_dendrogram(
            np.asarray(result["dendrogram"]["linkage"]),
            result["dendrogram"]["names"],
            plots / "dendrogram.png",
        ),
        "attribution": plot_attribution(
            pairs,
            plots / "attribution.png",
            title=f"Which dimensions of the {space} vectors carry the AAD",
        ),
    }
    return {k: Path(v).relative_to(out_dir) for k, v in out.items()}
