"""Stage 1, data: the intensity fingerprint, a raw-image statistic of every subject.

Per-channel foreground (non-zero) intensity percentiles of the raw images, *before* any
normalisation: what z-scoring removes before the encoder sees anything (a global gain, a smooth
bias field). ``aad-compare`` reports it as its own statistic beside the AAD
(:func:`aad_med.pipelines.intensity_step.intensity_statistics`); it is never an encoder feature.

:func:`cached_fingerprint` keeps a cohort's fingerprints in the embedding cache folder under a key
of every subject's files, so a rerun does not read the volumes again. No statistics here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from aad_med import CHANNELS
from aad_med.data.io import load_subject
from aad_med.data.records import Cohort, SubjectRecord
from aad_med.io_utils import cache_key, file_stats, read_cache_entry, write_cache_entry

log = logging.getLogger("aad_med.compare")

FINGERPRINT_PERCENTILES: tuple[float, ...] = (1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0)
"""Percentiles (per channel) of the fingerprint."""


def fingerprint_columns(percentiles: Sequence[float] = FINGERPRINT_PERCENTILES) -> list[str]:
    """Column names of the fingerprint, channel-major (``t1_p1``, ``t1_p5``, ...)."""
    return [f"{ch}_p{q:g}" for ch in CHANNELS for q in percentiles]


def intensity_fingerprint(
    records: Sequence[SubjectRecord],
    percentiles: Sequence[float] = FINGERPRINT_PERCENTILES,
) -> np.ndarray:
    """Per-channel foreground (non-zero) intensity percentiles of the raw images.

    Args:
        records: the subjects (their files are read with :func:`aad_med.data.io.load_subject`).
        percentiles: percentiles in [0, 100].

    Returns:
        ``(n_subjects, 4 * len(percentiles))`` float64, channel-major (t1, t1ce, t2, flair).

    Raises:
        InputError: a file cannot be read (named).
    """
    q = np.asarray(percentiles, dtype=np.float64)
    rows = [fingerprint_row(load_subject(rec, load_seg=False).image, q) for rec in records]
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 4 * q.size)


def fingerprint_row(
    image: np.ndarray, percentiles: Sequence[float] = FINGERPRINT_PERCENTILES
) -> np.ndarray:
    """One subject's fingerprint from its raw ``(4, X, Y, Z)`` image already in memory (the
    embedding computes it from the arrays it decodes, so each file is read once).

    Any crop of the image that keeps every non-zero voxel gives the same row.
    """
    q = np.asarray(percentiles, dtype=np.float64)
    row = []
    for ch in image:
        flat = ch.ravel(order="K")  # any layout: the percentiles do not depend on the order
        fg = flat[flat != 0]
        row.append(percentiles_of(fg, q) if fg.size else np.zeros(q.size))
    return np.concatenate(row).astype(np.float64)


_HISTOGRAM_SPAN = 1 << 20


def percentiles_of(values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.percentile(values, q)`` (linear method), from a histogram when the values are
    integers in a modest range (scanner intensities stored as int16 usually are): counting is
    linear in the voxels where selecting order statistics is not (2.5x faster at BraTS size).
    The order statistics are exact; the interpolation follows numpy's ``_lerp`` and agrees
    with ``np.percentile`` to about 1e-15 relative (float rounding)."""
    values = np.asarray(values).reshape(-1)
    lo, hi = values.min(), values.max()
    # Order statistics in float64 for stored integers (exact, as in their float32 cast).
    kind = np.dtype(np.float64) if values.dtype.kind in "iu" else values.dtype
    if values.dtype.kind in "iu" and values.dtype.itemsize <= 2:
        # Stored integers (int16 scanner data): counted as they are, no float round trip.
        base = int(lo)
        cum = np.cumsum(np.bincount(np.subtract(values, base, dtype=np.intp)))
    elif values.dtype.kind != "f" or not (
        np.isfinite(lo) and np.isfinite(hi) and hi - lo < _HISTOGRAM_SPAN
    ):
        return np.percentile(values, q)
    else:
        ints = values.astype(np.int64)
        if not np.array_equal(ints, values):
            return np.percentile(values, q)
        base = int(ints.min())
        cum = np.cumsum(np.bincount(ints - base))
    n = values.size
    qq = np.true_divide(q, 100)
    # numpy's virtual index for the linear method (alpha = beta = 1), term for term.
    virtual = n * qq + (1 + qq * (1 - 1 - 1)) - 1
    prev = np.clip(np.floor(virtual).astype(np.int64), 0, n - 1)
    nxt = np.clip(prev + 1, 0, n - 1)
    a = (base + np.searchsorted(cum, prev, side="right")).astype(kind)
    b = (base + np.searchsorted(cum, nxt, side="right")).astype(kind)
    gamma = np.asarray(virtual - np.floor(virtual), dtype=np.float64)
    diff = b - a
    out = np.add(a, diff * gamma)
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5, casting="unsafe")
    return out


def _entry(cohort: Cohort, cache_dir: str | Path) -> Path:
    subjects = [[rec.subject_id, file_stats(rec.files), rec.as_dict()] for rec in cohort.subjects]
    payload = {"v": 3, "percentiles": list(FINGERPRINT_PERCENTILES), "subjects": subjects}
    # .npz, not .npy: its zip members carry a CRC-32, so flipped bytes are seen, not read as
    # other intensities.
    return Path(cache_dir) / f"intensity-{cache_key(payload)}.npz"


def cached_fingerprint(
    cohort: Cohort,
    cache_dir: str | Path | None,
    computed: np.ndarray | None = None,
    write: bool = True,
) -> np.ndarray:
    """:func:`intensity_fingerprint` of a cohort, kept in ``cache_dir`` under a key of every
    subject's files (path, size, modification time, content digest) and the percentiles;
    ``None`` reads the volumes every time.

    The cache heals: an entry (``.npz``) that is unreadable or not a finite ``(n_subjects, columns)``
    float64 array is a :class:`~aad_med.io_utils.CacheWarning`, deleted and recomputed (never
    blamed on the cohort); a folder that cannot be written means running uncached.

    Args:
        cohort: the subjects.
        cache_dir: cache folder, or ``None``.
        computed: the rows already computed while embedding (:func:`fingerprint_row`); used
            (and stored) instead of reading the volumes again.
        write: store a computed fingerprint (``False``: a read-only cache).
    """
    if cache_dir is None:
        if computed is not None:
            return np.asarray(computed, dtype=np.float64)
        return intensity_fingerprint(cohort.subjects)
    entry = _entry(cohort, cache_dir)
    expected = (len(cohort.subjects), len(fingerprint_columns()))

    def read(path: Path) -> np.ndarray:
        with np.load(path, allow_pickle=False) as d:
            arr = d["fingerprint"]
        if arr.shape != expected:
            raise ValueError(f"shape {getattr(arr, 'shape', None)}, expected {expected}")
        if arr.dtype != np.float64 or not np.isfinite(arr).all():
            raise ValueError(f"dtype {arr.dtype} or non-finite values")
        return arr

    if computed is not None:
        raw = np.asarray(computed, dtype=np.float64)
    else:
        cached = read_cache_entry(entry, read, "intensity cache")
        if cached is not None:
            return cached
        raw = intensity_fingerprint(cohort.subjects)
    if write:
        write_cache_entry(entry, lambda f: np.savez(f, fingerprint=raw), "intensity cache")
    return raw
