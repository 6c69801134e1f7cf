"""Stage 6a, plots: the two figures of a training run (``loss_curve.png``, ``reconstructions.png``).

Draws what the training loop recorded; computes nothing but display scaling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med import CHANNELS
from aad_med.plots.style import OKABE_ITO, new_figure, save_figure


def plot_loss_curve(history: Sequence[Mapping], path: str | Path) -> Path:
    """Training (and validation, where recorded) loss per epoch, log scale.

    Args:
        history: one mapping per epoch with ``epoch``, ``train_loss`` and optionally ``val_loss``.
        path: PNG to write.
    """
    fig = new_figure(5.5, 3.5)
    ax = fig.add_subplot()
    epochs = [int(h["epoch"]) for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", color=OKABE_ITO[0], label="train")
    val = [(int(h["epoch"]), h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "s--", color=OKABE_ITO[1], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss")
    if history and all(h["train_loss"] > 0 for h in history):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return save_figure(fig, path)


def mid_slice(patch: np.ndarray) -> np.ndarray:
    """Middle slice along the last axis of a ``(X, Y, Z)`` patch (or the 2D patch itself)."""
    return patch[..., patch.shape[-1] // 2] if patch.ndim == 3 else patch


def plot_reconstructions(
    inputs: np.ndarray,
    recons: np.ndarray,
    path: str | Path,
    channels: Sequence[str] = CHANNELS,
    max_patches: int = 3,
) -> Path:
    """Input vs reconstruction, middle slice of each modality, for a few patches.

    Both rows of a patch share one grey scale per modality so differences are visible.

    Args:
        inputs: ``(N, C, X, Y, Z)`` input patches.
        recons: reconstructions of the same shape.
        path: PNG to write.
        channels: channel names (column titles).
        max_patches: at most this many patches (two rows each).
    """
    n = min(len(inputs), max_patches)
    n_ch = inputs.shape[1]
    fig = new_figure(1.8 * n_ch, 1.9 * 2 * n)
    axes = fig.subplots(2 * n, n_ch, squeeze=False)
    for i in range(n):
        for c in range(n_ch):
            a, b = mid_slice(inputs[i, c]), mid_slice(recons[i, c])
            lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
            for row, img, label in ((2 * i, a, "input"), (2 * i + 1, b, "reconstruction")):
                ax = axes[row, c]
                ax.imshow(
                    img.T, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(channels[c] if c < len(channels) else f"ch{c}", fontsize=9)
                if c == 0:
                    ax.set_ylabel(f"{label}\npatch {i}", fontsize=8)
    return save_figure(fig, path)
