"""Stage 4, embedding: roughness of the normalised input at several scales, inside the brain.

The ``texture`` block's strongest columns for a contrast (gamma) change at the default patch size
are its four *input* columns (roughness of the normalised channels); its other 112 columns, from
the encoder stages, carry little of it, and in a concatenated feature set they dilute it. This
block keeps only the input and looks at it at several scales: for lags ``k`` of 1, 2 and 4
voxels, the mean squared difference between foreground voxels ``k`` apart along each axis,
divided by twice the foreground variance (a normalised variogram: about 1 for white noise, small
for smooth images). Noise raises it at every lag, blur lowers it at short lags, and a contrast
change moves the tissue edges' share against the within-tissue noise. Pairs that touch the
background are left out, so the brain outline does not dominate.

Standardised with the checkpoint's fixed reference scale when it has one, else jointly over
all compared subjects (either way label-free, so permutation p-values stay
exact). No statistics and no file writing here.
"""

from __future__ import annotations

import numpy as np
import torch

from aad_med.embedding.acquisition import ConcatFeatureSet, StandardizedFeatureSet
from aad_med.embedding.features import PatchBatch, SubjectAccumulator, register_feature_set

LAGS: tuple[int, ...] = (1, 2, 4)
"""Voxel distances of the variogram."""


class InputTextureAccumulator(SubjectAccumulator):
    """Per channel: foreground power sums, and per lag the sum and count of squared differences."""

    def __init__(self):
        self.moments: np.ndarray | None = None  # (C, 3): n, Σx, Σx²
        self.diffs: np.ndarray | None = None  # (C, L, 2): Σd², pairs

    def add(self, batch: PatchBatch) -> None:
        x = batch.patches.detach().to(torch.float64).cpu()
        n_ch = x.shape[1]
        moments = np.zeros((n_ch, 3))
        diffs = np.zeros((n_ch, len(LAGS), 2))
        for c in range(n_ch):
            v = x[:, c]
            m = v != 0
            moments[c] = [float(m.sum()), float(v.sum()), float((v * v).sum())]
            # The pairs are selected with numpy (1.35x faster than torch's boolean indexing);
            # the same differences in the same order reach the same torch sum: bit-identical.
            vn, mn = v.numpy(), m.numpy()
            for li, k in enumerate(LAGS):
                for axis in (1, 2, 3):
                    n = vn.shape[axis]
                    if n <= k:
                        continue
                    hi = (slice(None),) * axis + (slice(k, None),)
                    lo = (slice(None),) * axis + (slice(0, n - k),)
                    both = mn[hi] & mn[lo]
                    d = torch.from_numpy(np.subtract(vn[hi], vn[lo])[both])
                    diffs[c, li] += [float((d * d).sum()), float(d.numel())]
        if self.moments is None:
            self.moments, self.diffs = moments, diffs
        else:
            self.moments += moments
            self.diffs += diffs

    def vector(self) -> np.ndarray:
        if self.moments is None or np.any(self.moments[:, 0] < 2):
            raise ValueError("no foreground voxels were added for this subject")
        n, s1, s2 = self.moments.T
        var = np.clip(s2 / n - (s1 / n) ** 2, 1e-12, None)
        pairs = np.maximum(self.diffs[:, :, 1], 1.0)
        return (self.diffs[:, :, 0] / pairs / (2.0 * var[:, None])).ravel()


class InputTextureFeatures(StandardizedFeatureSet):
    """Normalised variogram of each input channel inside the brain at lags 1, 2 and 4 voxels."""

    name = "input_texture"
    description = (
        "per normalised input channel, the mean squared difference of foreground voxels 1, 2 "
        "and 4 voxels apart over twice the foreground variance (roughness at several scales: "
        "sees noise, blur and contrast changes), standardised (fixed reference scale from the "
        "checkpoint when it has one, else over all compared subjects)"
    )

    def accumulator(self) -> SubjectAccumulator:
        return InputTextureAccumulator()


COMBINATIONS: tuple[tuple[str, ...], ...] = (
    ("input_texture", "intensity_shape"),
    ("input_texture", "intensity_shape", "intensity_variation"),
    ("multiscale", "input_texture", "intensity_shape"),
)

FEATURE_SETS = {"input_texture": InputTextureFeatures}


def register() -> None:
    """Make the block and :data:`COMBINATIONS` selectable by name (``embedding.features=``).

    Not done at import, for the reason given in :func:`aad_med.embedding.intensity_shape.register`;
    the combinations need that module's blocks registered too.
    """
    for name, factory in FEATURE_SETS.items():
        register_feature_set(name, factory)
    for parts in COMBINATIONS:
        register_feature_set("+".join(parts), lambda parts=parts: ConcatFeatureSet(parts))


__all__ = ["COMBINATIONS", "FEATURE_SETS", "LAGS", "InputTextureFeatures", "register"]
