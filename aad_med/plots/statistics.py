"""Figures of the statistics: permutation null distributions with the observed AAD, the
pairwise AAD heatmap, the MDS map and the dendrogram of cohorts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med.plots.style import OKABE_ITO, cohort_colors, new_figure, save_figure


def plot_null_distribution(pairs: Sequence[Mapping], path: str | Path) -> Path:
    """Per pair: histogram of AAD under label shuffles with the observed AAD as a line.

    Args:
        pairs: dicts with ``a``, ``b``, ``aad``, ``aad_p`` and ``null_aad_sample`` (values of
            AAD under permutation; may be empty when no permutations were run).
        path: output PNG.
    """
    n = max(1, len(pairs))
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig = new_figure(4.2 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, pair in zip(axes, pairs, strict=False):
        null = np.asarray(pair.get("null_aad_sample") or [], dtype=np.float64)
        obs = float(pair["aad"])
        if null.size:
            hi = max(float(null.max()), obs) * 1.05
            ax.hist(null, bins=40, range=(0, hi), color="0.6", label="null (shuffled labels)")
        ax.axvline(obs, color=OKABE_ITO[3], lw=2, label=f"observed AAD = {obs:.3g}")
        ax.set_title(f"{pair['a']} vs {pair['b']}: p = {_fmt_p(pair.get('aad_p'))}", fontsize=10)
        ax.set_xlabel("AAD")
        ax.set_ylabel("permutations")
        ax.legend(fontsize=7)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle("AAD against its permutation null")
    return save_figure(fig, path)


def plot_pairwise_aad(names: Sequence[str], matrix: np.ndarray, path: str | Path) -> Path:
    """Heatmap of the pairwise AAD matrix with values written in the cells."""
    m = np.asarray(matrix, dtype=np.float64)
    k = len(names)
    fig = new_figure(1.0 * k + 3.0, 0.9 * k + 2.0)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", vmin=0)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    top = float(m.max()) if m.size else 0.0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{m[i, j]:.3g}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if m[i, j] < 0.6 * top else "black",
            )
    fig.colorbar(im, ax=ax, label="AAD")
    ax.set_title("Pairwise AAD")
    return save_figure(fig, path)


def plot_mds(names: Sequence[str], coords: np.ndarray, path: str | Path) -> Path:
    """Cohorts placed in 2D so that distances approximate the pairwise AAD (classical MDS)."""
    c = np.asarray(coords, dtype=np.float64).reshape(len(names), -1)
    if c.shape[1] < 2:
        c = np.concatenate([c, np.zeros((len(names), 2 - c.shape[1]))], axis=1)
    colors = cohort_colors(list(names))
    fig = new_figure(5.0, 4.5)
    ax = fig.subplots()
    for name, (x, y) in zip(names, c[:, :2], strict=True):
        ax.scatter([x], [y], s=120, color=colors[name], edgecolor="black")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.margins(0.25)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("MDS 1 (AAD units)")
    ax.set_ylabel("MDS 2 (AAD units)")
    ax.set_title("Map of cohorts (distances ≈ AAD)")
    return save_figure(fig, path)


def plot_dendrogram(linkage: np.ndarray, names: Sequence[str], path: str | Path) -> Path:
    """Hierarchical clustering of cohorts by AAD (a scipy linkage matrix)."""
    from scipy.cluster.hierarchy import dendrogram

    z = np.asarray(linkage, dtype=np.float64).reshape(-1, 4)
    fig = new_figure(max(4.0, 1.0 * len(names) + 2), 3.8)
    ax = fig.subplots()
    if len(names) >= 2 and z.shape[0] == len(names) - 1:
        dendrogram(z, labels=list(names), ax=ax, color_threshold=0, above_threshold_color="#0072B2")
    else:
        ax.text(
            0.5, 0.5, "a dendrogram needs at least two cohorts", ha="center", transform=ax.transAxes
        )
    ax.set_ylabel("AAD (linkage height)")
    ax.set_title("Cohort dendrogram")
    return save_figure(fig, path)


def _fmt_p(p) -> str:
    if p is None:
        return "n/a"
    p = float(p)
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"
