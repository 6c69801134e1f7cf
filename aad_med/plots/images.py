"""Figures in image space: the decoded difference of cohort means (per modality) and the regional
AAD map overlaid on the cohorts' mean image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aad_med import CHANNELS
from aad_med.plots.style import new_figure, save_figure

VIEWS = ("sagittal", "coronal", "axial")


def _mid_slices(vol: np.ndarray, centre: Sequence[int] | None = None) -> list[np.ndarray]:
    """Three orthogonal slices of a 3D volume through ``centre`` (default: the middle),
    rotated for display (superior/anterior up)."""
    c = [s // 2 for s in vol.shape] if centre is None else [int(v) for v in centre]
    return [np.rot90(vol[c[0], :, :]), np.rot90(vol[:, c[1], :]), np.rot90(vol[:, :, c[2]])]


def plot_mean_difference(
    difference: np.ndarray,
    path: str | Path,
    channels: Sequence[str] = CHANNELS,
    title: str = "decode(mean B) − decode(mean A)",
) -> Path:
    """Middle slices (three views) of a decoded mean difference, one row per modality.

    Args:
        difference: ``(C, p, p, p)`` patch-space volume (normalised intensity units).
        path: output PNG.
        channels: modality names, one per row.
        title: figure title (name the pair).
    """
    d = np.asarray(difference, dtype=np.float64)
    lim = float(np.max(np.abs(d))) or 1.0
    fig = new_figure(7.5, 2.2 * d.shape[0] + 0.6)
    axes = fig.subplots(d.shape[0], 3, squeeze=False)
    im = None
    for i in range(d.shape[0]):
        for j, sl in enumerate(_mid_slices(d[i])):
            ax = axes[i, j]
            im = ax.imshow(sl, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(VIEWS[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(channels[i] if i < len(channels) else f"ch{i}")
    fig.colorbar(im, ax=axes, shrink=0.6, label="difference (z-score units)")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_regional_aad(
    aad_map: np.ndarray,
    background: np.ndarray,
    path: str | Path,
    title: str = "Regional AAD",
) -> Path:
    """Regional AAD as a heat overlay on a mean image, three slices through the peak.

    Args:
        aad_map: ``(X, Y, Z)`` AAD per voxel; NaN where no patch reached.
        background: ``(X, Y, Z)`` image to draw underneath (e.g. the cohorts' mean FLAIR).
        path: output PNG.
        title: figure title (name the pair).
    """
    m = np.asarray(aad_map, dtype=np.float64)
    bg = np.asarray(background, dtype=np.float64)
    finite = np.isfinite(m)
    centre = (
        np.unravel_index(np.nanargmax(np.where(finite, m, -np.inf)), m.shape)
        if finite.any()
        else None
    )
    vmax = float(np.nanmax(m)) if finite.any() else 1.0
    fig = new_figure(10.0, 3.8)
    axes = fig.subplots(1, 3)
    im = None
    for ax, sl_bg, sl_m, view in zip(
        axes, _mid_slices(bg, centre), _mid_slices(m, centre), VIEWS, strict=True
    ):
        ax.imshow(sl_bg, cmap="gray", interpolation="nearest")
        im = ax.imshow(
            np.ma.masked_invalid(sl_m),
            cmap="magma",
            alpha=0.6,
            vmin=0,
            vmax=vmax or 1.0,
            interpolation="nearest",
        )
        ax.set_title(view, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="AAD at this position")
    fig.suptitle(title)
    return save_figure(fig, path)
