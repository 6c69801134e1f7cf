"""Shared look of every figure: the Okabe-Ito colour-blind-safe palette, headless saving.

Importing this module selects matplotlib's Agg backend when no backend was chosen, so figures
render on machines without a display (clusters, CI).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from aad_med.io_utils import atomic_path  # noqa: E402

OKABE_ITO: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
"""Okabe & Ito (2008) palette, ordered so the first colours stay distinct in grey scale."""

DPI = 130


def cohort_colors(names: list[str] | tuple[str, ...]) -> dict[str, str]:
    """One palette colour per cohort name, stable in the given order (cycles after eight)."""
    return {name: OKABE_ITO[i % len(OKABE_ITO)] for i, name in enumerate(names)}


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created) and close it.

    Written under a temporary name first and renamed, so a crash never leaves half a PNG.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches with the project's defaults."""
    return plt.figure(figsize=(width, height), layout="constrained")
