"""Figures of the latent space: cohort mean latent vectors with bootstrap bands, subjects in a
PCA plane with 95% ellipses, and the attribution of AAD² to the dimensions of the vectors the
statistics used (latent dimensions, or the columns of another feature set)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med.plots.style import cohort_colors, new_figure, save_figure
from aad_med.plots.summaries import covariance_ellipse, dimension_order, pca_2d

MAX_TICK_LABELS = 40


def plot_latent_means(
    means: Mapping[str, np.ndarray],
    bands: Mapping[str, np.ndarray] | None,
    path: str | Path,
    shares: np.ndarray | None = None,
    shares_label: str = "share of AAD²",
    title: str = "Cohort mean latent vectors (95% bootstrap bands)",
) -> Path:
    """Each cohort's mean latent vector, dimensions ordered by their share of AAD².

    Args:
        means: ``{cohort: (D,)}`` mean vectors.
        bands: ``{cohort: (2, D)}`` lower/upper 95% bounds of each mean, or ``None``.
        path: output PNG.
        shares: ``(D,)`` share of AAD² per dimension (fixes the order and is drawn as bars
            under the means); ``None`` keeps the natural order.
        shares_label: y label of the share panel (names the pair the shares come from).
        title: figure title.

    Returns:
        The written path.
    """
    names = list(means)
    dim = int(np.asarray(means[names[0]]).shape[0])
    order = dimension_order(shares) if shares is not None else np.arange(dim)
    colors = cohort_colors(names)
    width = min(18.0, max(6.0, 0.22 * dim + 3))
    fig = new_figure(width, 5.5 if shares is not None else 4.0)
    if shares is not None:
        ax, ax_s = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    else:
        ax, ax_s = fig.subplots(1, 1), None
    x = np.arange(dim)
    for name in names:
        m = np.asarray(means[name], dtype=np.float64)[order]
        ax.plot(x, m, marker="o", ms=3, lw=1.2, color=colors[name], label=name)
        if bands is not None and name in bands:
            b = np.asarray(bands[name], dtype=np.float64)[:, order]
            ax.fill_between(x, b[0], b[1], color=colors[name], alpha=0.25, lw=0)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_ylabel("mean latent value")
    ax.set_title(title)
    ax.legend(title="cohort", fontsize=8, loc="best")
    last = ax_s if ax_s is not None else ax
    if ax_s is not None:
        ax_s.bar(x, np.asarray(shares, dtype=np.float64)[order], color="0.35")
        ax_s.set_ylabel(shares_label, fontsize=8)
        ax_s.set_ylim(0, max(1e-12, float(np.max(shares))) * 1.1)
    _dimension_ticks(last, order)
    last.set_xlabel(
        "latent dimension (ordered by share of AAD²)" if shares is not None else "latent dimension"
    )
    return save_figure(fig, path)


def plot_latent_pca(
    vectors: Mapping[str, np.ndarray],
    path: str | Path,
    title: str = "Subjects in latent space (PCA); × = cohort mean, ellipse = 95%",
) -> Path:
    """Subjects of every cohort on the first two principal axes, cohort means marked (×) and
    95% normal ellipses drawn (``title`` names the space when it is not the latent one)."""
    names = list(vectors)
    colors = cohort_colors(names)
    projected, explained = pca_2d(dict(vectors))
    fig = new_figure(6.0, 5.0)
    ax = fig.subplots()
    for name in names:
        p = projected[name]
        ax.scatter(
            p[:, 0], p[:, 1], s=18, color=colors[name], alpha=0.75, label=f"{name} (n={len(p)})"
        )
        c = p.mean(axis=0)
        ax.scatter([c[0]], [c[1]], marker="X", s=160, color=colors[name], edgecolor="black", lw=1.0)
        ell = covariance_ellipse(p)
        if ell is not None:
            ax.plot(ell[:, 0], ell[:, 1], color=colors[name], lw=1.2)
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}% of variance)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_attribution(
    pairs: Sequence[Mapping],
    path: str | Path,
    top: int = 10,
    title: str = "Which latent dimensions carry the distance",
) -> Path:
    """Per pair, the dimensions carrying the largest share of AAD² (horizontal bars).

    Args:
        pairs: dicts with ``a``, ``b`` and ``top_dims`` as ``[[dim, share], ...]``.
        path: output PNG.
        top: bars per pair.
        title: figure title (names the feature set when it is not ``latent``).
    """
    n = max(1, len(pairs))
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig = new_figure(4.2 * cols, 0.28 * top * rows + 1.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, pair in zip(axes, pairs, strict=False):
        dims = [(int(d), float(s)) for d, s in list(pair["top_dims"])[:top]]
        y = np.arange(len(dims))[::-1]
        ax.barh(y, [s for _, s in dims], color="#0072B2")
        ax.set_yticks(y, [f"z{d}" for d, _ in dims], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of AAD²")
        ax.set_title(f"{pair['a']} vs {pair['b']}", fontsize=10)
    for ax in axes[len(pairs) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


def _dimension_ticks(ax, order: np.ndarray) -> None:
    dim = len(order)
    step = max(1, int(np.ceil(dim / MAX_TICK_LABELS)))
    ticks = np.arange(0, dim, step)
    ax.set_xticks(ticks, [f"z{int(order[t])}" for t in ticks], rotation=90, fontsize=7)
