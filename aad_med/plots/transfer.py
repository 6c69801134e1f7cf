"""Figure of transferability: the performance drop of every target cohort against one distance,
with the monotone fit and its prediction band."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med.plots.style import OKABE_ITO, new_figure, save_figure


def plot_drop_vs_distance(
    names: Sequence[str],
    distance: Sequence[float],
    drop: Sequence[float],
    drop_ci: Sequence[Sequence[float]] | None,
    fit: Mapping | None,
    path: str | Path,
    distance_label: str = "AAD",
    score_label: str = "Dice",
    correlation: Mapping | None = None,
) -> Path:
    """Scatter of the drop (source score − target score) against a distance, one labelled point
    per target, vertical bars for the targets' score intervals, and the isotonic fit with its 95%
    prediction band (``fit``: :meth:`aad_med.distances.transfer.MonotoneFit.to_dict`)."""
    x = np.asarray(distance, dtype=np.float64)
    y = np.asarray(drop, dtype=np.float64)
    fig = new_figure(5.6, 4.2)
    ax = fig.subplots()
    if fit is not None:
        gx = np.asarray(fit["grid_distance"], dtype=np.float64)
        band = np.asarray(fit["grid_interval95"], dtype=np.float64).reshape(-1, 2)
        ax.fill_between(gx, band[:, 0], band[:, 1], color=OKABE_ITO[5], alpha=0.25,
                        label="95% prediction band", lw=0)  # fmt: skip
        ax.plot(gx, fit["grid_drop"], color=OKABE_ITO[0], lw=2, label="monotone fit")
    if drop_ci is not None:
        ci = np.asarray(drop_ci, dtype=np.float64).reshape(-1, 2)
        ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="none", ecolor="0.6", lw=1)
    ax.scatter(x, y, color=OKABE_ITO[3], zorder=3, s=22)
    for xi, yi, name in zip(x, y, names, strict=True):
        ax.annotate(str(name), (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel(f"{distance_label} (source → target)")
    ax.set_ylabel(f"{score_label} drop (source − target)")
    title = f"{score_label} drop against {distance_label}"
    if correlation and correlation.get("spearman") is not None:
        title += f"\nSpearman ρ = {correlation['spearman']:.2f}"
        if correlation.get("spearman_ci95"):
            lo, hi = correlation["spearman_ci95"]
            title += f" [{lo:.2f}, {hi:.2f}]"
    ax.set_title(title, fontsize=10)
    if fit is not None:
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)
