"""Stage 1, data: the cohort fingerprint (nnU-Net style), the first thing a user sees of a cohort.

A JSON-ready summary of a validated cohort: subjects, channels, shapes, spacings, orientations,
brain size, tumour labels and per-channel foreground intensity statistics of the raw images
(before resampling or normalisation). Subjects are read one at a time, so memory stays flat.

Intensity statistics: mean, std, min and max are exact over all foreground (non-zero) voxels;
percentiles come from a seeded sample of at most :data:`SAMPLES_PER_SUBJECT` foreground voxels
per subject and channel (as nnU-Net does), so they are reproducible and cheap.
"""

from __future__ import annotations

import math
from collections import Counter

import nibabel as nib
import numpy as np

from aad_med import CHANNELS, __version__
from aad_med.data.io import MAX_VOXELS, check_affine, load_subject, read_header
from aad_med.data.records import Cohort

FINGERPRINT_VERSION = 1
SAMPLES_PER_SUBJECT = 10_000
PERCENTILES: dict[str, float] = {
    "p00_5": 0.5,
    "p01": 1.0,
    "p25": 25.0,
    "p50": 50.0,
    "p75": 75.0,
    "p99": 99.0,
    "p99_5": 99.5,
}
"""Percentile keys of ``fingerprint["intensity"][channel]`` and the percentile each stands for."""


class _Moments:
    """Exact running count, sum, sum of squares, min and max (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.s = 0.0
        self.ss = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def add(self, x: np.ndarray) -> None:
        if x.size == 0:
            return
        x64 = x.astype(np.float64, copy=False)
        self.n += int(x.size)
        self.s += float(x64.sum())
        self.ss += float(np.square(x64).sum())
        self.lo = min(self.lo, float(x64.min()))
        self.hi = max(self.hi, float(x64.max()))

    def summary(self) -> dict:
        if self.n == 0:
            return {"n_voxels": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0)
        return {
            "n_voxels": self.n,
            "mean": mean,
            "std": math.sqrt(var),
            "min": self.lo,
            "max": self.hi,
        }


def cohort_fingerprint(
    cohort: Cohort,
    max_subjects: int | None = None,
    seed: int = 0,
    max_voxels: int = MAX_VOXELS,
) -> dict:
    """Summarise a (validated) cohort as a JSON-ready dict.

    Args:
        cohort: the cohort, usually from :func:`aad_med.data.validation.load_cohort`.
        max_subjects: read voxels of at most this many subjects, evenly spread over the sorted
            IDs (shapes and spacings still come from every subject's header); ``None``: all.
        seed: seed of the percentile voxel sample.
        max_voxels: header size limit passed to the loader.

    Returns:
        A dict with keys ``path, layout, n_subjects, subject_ids, channels, n_with_seg, shapes,
        spacings, median_shape, median_spacing, orientations, intensity, brain_volume_ml, seg,
        n_fingerprinted, fingerprinted_ids, n_skipped, skipped, aad_med_version,
        fingerprint_version``. ``shapes``/``spacings`` are per subject, in ``subject_ids`` order.
        ``intensity[channel]`` holds ``n_voxels, mean, std, min, max`` and the keys of
        :data:`PERCENTILES` over foreground (non-zero) voxels.

    Raises:
        InputError: a file cannot be read (validate the cohort first to get every problem).
    """
    subjects = cohort.subjects
    shapes, spacings, orientations = [], [], Counter()
    for s in subjects:
        path = s.images[CHANNELS[0]].path
        img = read_header(path, max_voxels)
        shapes.append([int(v) for v in img.shape[:3]])
        affine = check_affine(img, path)
        spacings.append([_round(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))])
        orientations["".join(nib.aff2axcodes(affine))] += 1

    chosen = _spread(len(subjects), max_subjects)
    moments = {ch: _Moments() for ch in CHANNELS}
    samples: dict[str, list[np.ndarray]] = {ch: [] for ch in CHANNELS}
    brain_ml: list[float] = []
    label_voxels: Counter[int] = Counter()
    tumour_fractions: list[float] = []
    n_with_tumour = 0
    for idx in chosen:
        subject = subjects[idx]
        # Per-subject seed: the sample does not depend on which other subjects are read.
        rng = np.random.default_rng([seed, idx])
        loaded = load_subject(subject, max_voxels=max_voxels)
        brain = np.any(loaded.image != 0, axis=0)
        voxel_ml = float(np.prod(loaded.spacing)) / 1000.0
        brain_ml.append(float(brain.sum()) * voxel_ml)
        for c, ch in enumerate(CHANNELS):
            fg = loaded.image[c][loaded.image[c] != 0]
            moments[ch].add(fg)
            if fg.size > SAMPLES_PER_SUBJECT:
                fg = rng.choice(fg, SAMPLES_PER_SUBJECT, replace=False)
            samples[ch].append(fg.astype(np.float32, copy=True))
        if loaded.seg is not None:
            labels, counts = np.unique(loaded.seg, return_counts=True)
            label_voxels.update({int(v): int(n) for v, n in zip(labels, counts, strict=True)})
            tumour = int(np.count_nonzero(loaded.seg))
            n_with_tumour += tumour > 0
            tumour_fractions.append(tumour / max(int(brain.sum()), 1))
        del loaded, brain

    intensity = {}
    for ch in CHANNELS:
        stats = moments[ch].summary()
        pooled = np.concatenate(samples[ch]) if samples[ch] else np.empty(0, np.float32)
        for key, q in PERCENTILES.items():
            stats[key] = float(np.percentile(pooled, q)) if pooled.size else None
        intensity[ch] = stats

    fingerprinted_ids = [subjects[i].subject_id for i in chosen]
    return {
        "path": str(cohort.path),
        "layout": cohort.layout,
        "n_subjects": len(subjects),
        "subject_ids": sorted(cohort.subject_ids),
        "channels": list(CHANNELS),
        "n_with_seg": cohort.n_with_seg,
        "shapes": shapes,
        "spacings": spacings,
        "median_shape": _median(shapes),
        "median_spacing": _median(spacings),
        "orientations": dict(sorted(orientations.items())),
        "intensity": intensity,
        "brain_volume_ml": _describe(brain_ml),
        "seg": {
            "n_read": len(tumour_fractions),
            "n_with_tumour": int(n_with_tumour),
            "label_voxels": {str(k): v for k, v in sorted(label_voxels.items())},
            "tumour_fraction": _describe(tumour_fractions),
        },
        "n_fingerprinted": len(chosen),
        "fingerprinted_ids": fingerprinted_ids,
        "n_skipped": len(cohort.skipped),
        "skipped": list(cohort.skipped),
        "aad_med_version": __version__,
        "fingerprint_version": FINGERPRINT_VERSION,
    }


def _spread(n: int, k: int | None) -> list[int]:
    """Indices of ``k`` of ``n`` items evenly spread (all when ``k`` is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, k)})


def _describe(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def _median(rows: list[list[float]]) -> list[float] | None:
    if not rows:
        return None
    return [_round(v) for v in np.median(np.asarray(rows, dtype=np.float64), axis=0)]


def _round(v: float) -> float:
    # Spacings from affines carry float noise (0.9999999); six decimals keep JSON readable.
    return round(float(v), 6)
