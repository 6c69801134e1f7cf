"""Stage 4, embedding: feature blocks that keep the shape and the spatial variation of intensity.

The per-channel z-score of preprocessing removes a global gain and offset, and the encoder's
instance normalisation removes each patch's mean and spread, so a contrast change (gamma) or a
smooth bias field leaves little in the encoder's activations. Both leave marks that z-scoring
cannot remove, and these blocks read them straight from the normalised evaluation patches the
encoder sees (no extra file reads):

* ``intensity_shape``: quantiles, skewness and kurtosis of each channel's normalised foreground
  (non-zero) voxels, pooled over all the subject's patches. A gamma changes the spacing of the
  tissue peaks and the skewness; noise and blur widen or narrow the peaks.
* ``intensity_variation``: how much the intensity of each channel drifts across the brain. For
  every patch with mostly brain, the 25th, 50th and 75th percentile of its foreground voxels;
  the subject's vector is, per channel and percentile, the standard deviation over patches, and
  the share of the patch medians' variance explained by a linear trend in the patch centres.
  A multiplicative bias field moves the same tissue up in one region and down in another.

Each block is standardised with the checkpoint's fixed reference scale when it has one, else
jointly over all compared subjects (either way label-free, so permutation
p-values stay exact), like the other acquisition blocks, and combines with them
(e.g. ``multiscale+texture+intensity_shape``); :func:`register` makes them selectable by name.
No statistics and no file writing here.
"""

from __future__ import annotations

import numpy as np
import torch

from aad_med.embedding.acquisition import ConcatFeatureSet, StandardizedFeatureSet
from aad_med.embedding.features import PatchBatch, SubjectAccumulator, register_feature_set

SHAPE_QUANTILES: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
"""Quantiles of the normalised foreground intensities in the ``intensity_shape`` block."""

HIST_RANGE = 8.0
"""The histogram covers normalised intensities in ``[-HIST_RANGE, HIST_RANGE]`` (clamped)."""

HIST_BINS = 1600
"""Histogram bins (0.01 z-units wide): quantile error far below subject-to-subject spread."""

VARIATION_QUANTILES: tuple[float, ...] = (0.25, 0.5, 0.75)
"""Per-patch foreground percentiles whose spread over patches ``intensity_variation`` reports."""

VARIATION_MIN_FOREGROUND = 0.25
"""A patch counts for ``intensity_variation`` when this share of its voxels is foreground (the
evaluation grid's own minimum, so at patch 32 every evaluated patch counts)."""


def _foreground_values(channel: torch.Tensor) -> torch.Tensor:
    """Non-zero voxels of one channel (background is exactly 0 after nonzero z-scoring)."""
    return channel[channel != 0]


class IntensityShapeAccumulator(SubjectAccumulator):
    """Per channel: a fixed histogram and the first four power sums of foreground voxels."""

    def __init__(self):
        self.hist: np.ndarray | None = None  # (C, bins)
        self.sums: np.ndarray | None = None  # (C, 5): n, Σx, Σx², Σx³, Σx⁴

    def add(self, batch: PatchBatch) -> None:
        x = batch.patches.detach().to(torch.float64).cpu()
        n_ch = x.shape[1]
        hist = np.zeros((n_ch, HIST_BINS))
        sums = np.zeros((n_ch, 5))
        for c in range(n_ch):
            v = _foreground_values(x[:, c])
            if v.numel() == 0:
                continue
            vc = v.clamp(-HIST_RANGE, HIST_RANGE)
            hist[c] = torch.histc(vc, bins=HIST_BINS, min=-HIST_RANGE, max=HIST_RANGE).numpy()
            sums[c] = [v.numel(), *(float((v**k).sum()) for k in (1, 2, 3, 4))]
        if self.hist is None:
            self.hist, self.sums = hist, sums
        else:
            self.hist += hist
            self.sums += sums

    def vector(self) -> np.ndarray:
        if self.hist is None or np.any(self.sums[:, 0] == 0):
            raise ValueError("no foreground voxels were added for this subject")
        edges = np.linspace(-HIST_RANGE, HIST_RANGE, HIST_BINS + 1)
        parts = []
        for hist, (n, s1, s2, s3, s4) in zip(self.hist, self.sums, strict=True):
            cdf = np.concatenate([[0.0], np.cumsum(hist) / hist.sum()])
            # Linear interpolation of the inverse CDF within bins.
            q = np.interp(SHAPE_QUANTILES, cdf, edges)
            mean = s1 / n
            var = max(s2 / n - mean**2, 1e-12)
            m3 = s3 / n - 3 * mean * s2 / n + 2 * mean**3
            m4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4
            parts.append(np.concatenate([q, [m3 / var**1.5, m4 / var**2 - 3.0]]))
        return np.concatenate(parts)


class IntensityShapeFeatures(StandardizedFeatureSet):
    """Quantiles, skewness and kurtosis of each channel's normalised foreground intensities."""

    name = "intensity_shape"
    description = (
        "per channel, quantiles (1-99%), skewness and excess kurtosis of the normalised "
        "foreground voxels of all the subject's patches (the shape of the intensity "
        "distribution, which z-scoring keeps: sees contrast/gamma changes), standardised (fixed "
        "reference scale from the checkpoint when it has one, else over all compared subjects)"
    )

    def accumulator(self) -> SubjectAccumulator:
        return IntensityShapeAccumulator()


class IntensityVariationAccumulator(SubjectAccumulator):
    """Per usable patch: its centre and the foreground percentiles of every channel."""

    def __init__(self):
        self.centres: list[np.ndarray] = []
        self.levels: list[np.ndarray] = []  # each (C, len(VARIATION_QUANTILES))

    def add(self, batch: PatchBatch) -> None:
        x = batch.patches.detach().to(torch.float32).cpu()
        p = np.asarray(x.shape[2:], dtype=np.float64)
        q = torch.tensor(VARIATION_QUANTILES, dtype=torch.float32)
        pos = batch.positions.detach().cpu().numpy().astype(np.float64)
        fg = (x != 0).flatten(2).float().mean(dim=2)  # (B, C)
        for i in range(x.shape[0]):
            if bool((fg[i] < VARIATION_MIN_FOREGROUND).any()):
                continue
            rows = [torch.quantile(_foreground_values(ch), q).numpy() for ch in x[i]]
            self.levels.append(np.stack(rows).astype(np.float64))
            self.centres.append(pos[i] + p / 2.0)

    def vector(self) -> np.ndarray:
        if len(self.levels) < 5:
            raise ValueError(
                f"only {len(self.levels)} patch(es) with at least "
                f"{VARIATION_MIN_FOREGROUND:.0%} brain; intensity_variation needs 5"
            )
        lev = np.stack(self.levels)  # (P, C, Q)
        spread = lev.std(axis=0)  # (C, Q)
        centres = np.stack(self.centres)
        design = np.column_stack([np.ones(len(centres)), centres - centres.mean(axis=0)])
        med = lev[:, :, VARIATION_QUANTILES.index(0.5)]  # (P, C)
        coef, *_ = np.linalg.lstsq(design, med, rcond=None)
        resid = med - design @ coef
        total = ((med - med.mean(axis=0)) ** 2).sum(axis=0)
        r2 = np.where(total > 0, 1.0 - (resid**2).sum(axis=0) / np.where(total > 0, total, 1), 0)
        return np.concatenate([spread, r2[:, None]], axis=1).ravel()


class IntensityVariationFeatures(StandardizedFeatureSet):
    """Spread over the brain of each channel's patch-wise foreground percentiles."""

    name = "intensity_variation"
    description = (
        "per channel, the standard deviation over the subject's brain patches of each patch's "
        "25th/50th/75th foreground percentile and the share of the patch medians' variance "
        "explained by a linear trend in position (smooth intensity drift: sees bias fields), "
        "standardised (fixed reference scale from the "
        "checkpoint when it has one, else over all compared subjects)"
    )

    def accumulator(self) -> SubjectAccumulator:
        return IntensityVariationAccumulator()


COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("multiscale", "texture", "intensity_shape"),
    ("multiscale", "texture", "intensity_shape", "intensity_variation"),
    ("texture", "intensity_shape"),
    ("intensity_shape", "intensity_variation"),
)

FEATURE_SETS = {
    "intensity_shape": IntensityShapeFeatures,
    "intensity_variation": IntensityVariationFeatures,
}


def register() -> None:
    """Make the blocks and :data:`COMBINATIONS` selectable by name (``embedding.features=``).

    Not done at import: the report describes every registered feature set with its measured
    detection rates, so a set becomes selectable together with that text.
    """
    for name, factory in FEATURE_SETS.items():
        register_feature_set(name, factory)
    for parts in COMBINATIONS:
        register_feature_set("+".join(parts), lambda parts=parts: ConcatFeatureSet(parts))


__all__ = [
    "COMBINATIONS",
    "FEATURE_SETS",
    "IntensityShapeFeatures",
    "IntensityVariationFeatures",
    "register",
]
