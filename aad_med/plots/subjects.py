"""Figures of the per-subject step: image-quality metrics per cohort side by side, mid-slice
thumbnails of a subject's channels, and the drift of batches against a reference.

One function per figure; numbers come in as arrays or dicts (no statistics computed here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med import CHANNELS
from aad_med.io_utils import atomic_path
from aad_med.plots.style import DPI, cohort_colors, new_figure, save_figure

QUALITY_METRICS = ("snr_total", "cnr", "cjv", "efc", "inu_range", "wm2max")
"""IQMs shown in the quality figure (one row each; fber is undefined on skull-stripped data)."""


def plot_quality(
    columns: Sequence[str],
    values: Mapping[str, np.ndarray],
    path: str | Path,
    metrics: Sequence[str] = QUALITY_METRICS,
) -> Path:
    """Each cohort's distribution of each IQM, cohorts side by side within each channel (box
    plus subjects); one panel per metric.

    Args:
        columns: IQM column names ``{channel}_{metric}``.
        values: ``{cohort: (n, len(columns))}`` (NaN where undefined).
        path: output PNG.
        metrics: metrics to show, one panel each (those without columns are left out).
    """
    names = list(values)
    colors = cohort_colors(names)
    shown = [m for m in metrics if any(f"{ch}_{m}" in columns for ch in CHANNELS)]
    width = len(names) + 1  # one gap between channels
    fig = new_figure(max(6.0, 0.35 * width * len(CHANNELS) + 1.5), 1.9 * len(shown) + 0.6)
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, shown, strict=True):
        data, pos, dots = [], [], []
        for c, ch in enumerate(CHANNELS):
            col = f"{ch}_{metric}"
            if col not in columns:
                continue
            j = list(columns).index(col)
            for k, name in enumerate(names):
                v = np.asarray(values[name], dtype=np.float64)[:, j]
                v = v[np.isfinite(v)]
                x = c * width + k
                if v.size:
                    data.append(v)
                    pos.append(x)
                    dots.append((x + rng.uniform(-0.15, 0.15, v.size), v, colors[name]))
        if data:
            ax.boxplot(data, positions=pos, widths=0.6, showfliers=False)
        for x, v, color in dots:
            ax.scatter(x, v, s=6, color=color, alpha=0.7, zorder=3)
        centres = [c * width + (len(names) - 1) / 2 for c in range(len(CHANNELS))]
        ax.set_xticks(centres, list(CHANNELS))
        ax.set_xlim(-1, len(CHANNELS) * width - 1)
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [axes[0].scatter([], [], s=12, color=colors[n], label=n) for n in names]
    axes[0].legend(handles=handles, fontsize=7, loc="upper right", ncols=min(4, len(names)))
    fig.suptitle("Image-quality metrics per cohort and channel")
    return save_figure(fig, path)


def plot_thumbnails(record, path: str | Path, title: str = "") -> Path:
    """The middle slice along the third stored axis of each channel of one subject, from its raw
    files (:func:`aad_med.data.io.read_mid_slice`: kept from the embedding's decode, or only
    that slice read); the grey range is 0 to the 99.5th percentile of the slice's non-zero
    voxels. :class:`ThumbnailSheet` draws several subjects' faster.

    Raises:
        InputError: a file cannot be read (named by the loader).
    """
    with ThumbnailSheet() as sheet:
        return sheet.draw(record, path, title)


class ThumbnailSheet:
    """Draws :func:`plot_thumbnails` figures of several subjects on one figure whose axes are
    built once, only the images, grey ranges and title changing (the same PNG as a fresh figure;
    building the axes was a fifth of each thumbnail's time). Use as a context manager."""

    def __init__(self) -> None:
        self.fig = None
        self.images: list = []
        self.shapes: list[tuple[int, ...]] = []
        self.title = None

    def __enter__(self) -> ThumbnailSheet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fig is not None:
            import matplotlib.pyplot as plt  # after plots.style chose the backend

            plt.close(self.fig)
        self.fig, self.images, self.shapes, self.title = None, [], [], None

    def _build(self, n: int) -> None:
        self.fig = new_figure(1.9 * n, 2.2)
        # Fixed margins instead of the layout engine, and axes born without ticks: the saved
        # figure is trimmed to its content anyway, and this halves the drawing time.
        self.fig.set_layout_engine("none")
        self.axes = self.fig.subplots(
            1,
            n,
            squeeze=False,
            subplot_kw={"xticks": [], "yticks": []},
            gridspec_kw={"left": 0.01, "right": 0.99, "bottom": 0.01, "top": 0.8, "wspace": 0.06},
        )[0]
        for c, ax in enumerate(self.axes):
            ax.set_title(CHANNELS[c] if c < len(CHANNELS) else f"ch{c}", fontsize=9)
        self.title = self.fig.suptitle("", fontsize=9)

    def draw(self, record, path: str | Path, title: str = "") -> Path:
        """One subject's thumbnails (:func:`plot_thumbnails`) written to ``path``.

        Raises:
            InputError: a file cannot be read (named by the loader).
        """
        from aad_med.data.io import read_mid_slice

        slices = [np.rot90(read_mid_slice(record.images[ch]).astype(np.float64)) for ch in CHANNELS]
        if self.fig is not None and self.shapes != [sl.shape for sl in slices]:
            self.close()  # another grid: the images' extents and the axes change
        if self.fig is None:
            self._build(len(slices))
        for c, (ax, sl) in enumerate(zip(self.axes, slices, strict=True)):
            fg = sl[sl != 0]
            hi = float(np.percentile(fg, 99.5)) if fg.size else 1.0
            if len(self.images) <= c:
                im = ax.imshow(sl, cmap="gray", vmin=0.0, vmax=hi or 1.0, interpolation="nearest")
                self.images.append(im)
            else:
                self.images[c].set_data(sl)
                self.images[c].set_clim(0.0, hi or 1.0)
        self.shapes = [sl.shape for sl in slices]
        self.title.set_text(title)
        self.title.set_visible(bool(title))
        path = Path(path)
        with atomic_path(path) as tmp:
            # zlib level 3, not PIL's 6: half the encoding time and a smaller file for these
            # noisy greyscale slices (110 vs 133 kB at BraTS size).
            self.fig.savefig(
                tmp, dpi=DPI, bbox_inches="tight", format="png", pil_kwargs={"compress_level": 3}
            )
        return path


def plot_drift(points: Sequence[Mapping], reference: str, path: str | Path) -> Path:
    """AAD (with 95% CI) of each batch against the reference, batches in the order given; the
    permutation p-value is written above each point.

    Args:
        points: one dict per batch with ``batch``, ``aad``, ``aad_ci95``, ``aad_p``.
        reference: the reference cohort's name (axis label).
        path: output PNG.
    """
    fig = new_figure(max(4.0, 1.1 * len(points) + 2.0), 3.2)
    ax = fig.subplots()
    x = np.arange(len(points))
    aad = np.array([float(p["aad"]) for p in points])
    lo = np.array([float(p["aad_ci95"][0]) for p in points])
    hi = np.array([float(p["aad_ci95"][1]) for p in points])
    ax.errorbar(x, aad, yerr=[np.clip(aad - lo, 0, None), np.clip(hi - aad, 0, None)], fmt="o-")
    for xi, p, top in zip(x, points, hi, strict=True):
        ax.annotate(
            f"p={float(p['aad_p']):.3g}",
            (xi, top),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
        )
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.margins(y=0.15)
    ax.set_xticks(x, [str(p["batch"]) for p in points], rotation=30)
    ax.set_ylabel(f"AAD vs {reference}")
    ax.set_xlabel("batch (in the order given)")
    ax.set_title("Drift against the reference")
    return save_figure(fig, path)
