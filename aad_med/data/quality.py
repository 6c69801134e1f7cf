"""Stage 1, data: MRIQC-style image-quality metrics (IQMs) of one subject's raw images.

Computed on the raw voxels (before resampling or normalisation) of skull-stripped BraTS-style
data. Pure numpy/scipy on arrays, plus :func:`subject_quality`, which reads one subject through
:func:`aad_med.data.io.load_subject`. No statistics across subjects and no file writing here.

Tissue classes. :func:`tissue_classes` runs a 3-class k-means on the T1 intensities of the
brain mask (non-zero voxels of any channel), tumour voxels (``seg > 0``) left out, and labels
the classes by increasing mean: 1 CSF, 2 GM, 3 WM (the T1 order). The same classes are used for
every channel, so in T2/FLAIR "WM" is still the T1-bright tissue.

Metrics of one channel ``I`` (brain mask ``B``, class masks ``C``, ``G``, ``W``; ``μ_X``, ``σ_X``
mean and population standard deviation of ``I`` over mask ``X``, ``n_X`` its voxel count):

* ``snr_csf``, ``snr_gm``, ``snr_wm``: ``μ_X / (σ_X √(n_X / (n_X − 1)))`` (MRIQC ``snr``);
  ``snr_total`` is their mean. Higher is better.
* ``cnr``: ``|μ_G − μ_W| / √(σ_G² + σ_W²)``. MRIQC adds the air variance ``σ_air²`` under the
  root; skull-stripped data have no air, so that term is dropped. Higher is better.
* ``cjv``: ``(σ_W + σ_G) / |μ_W − μ_G|`` (coefficient of joint variation). Lower is better.
* ``efc``: entropy focus criterion over the brain mask, ``x_i = max(I_i, 0)``,
  ``b = √(Σ x_i²)``, ``E = Σ (x_i/b) ln(x_i/b)``, ``E_max = √N ln(1/√N)`` (``N = n_B``),
  ``efc = E / E_max``: 1 for a uniform image, smaller when energy is concentrated in few voxels
  (sharp edges, high contrast). MRIQC sums over the whole frame; here only the brain counts,
  so the brain's share of the field of view does not change the value.
* ``inu_range``: an intensity non-uniformity (bias field) measure without N4. The field is the
  WM intensity smoothed by normalised convolution, ``F = g_s * (I·1_W) / g_s * 1_W`` with a
  Gaussian ``g_s`` of ``s`` = 1/8 of the brain's largest bounding-box edge (voxels, so it is
  scale-free), divided by its median over ``W``; ``inu_range`` is its 95th minus 5th percentile
  over ``W`` (MRIQC's ``inu_range`` on its N4 field). 0 for a flat field; larger is worse.
* ``fber``: ``mean(I² over B) / mean(I² over the background)`` (MRIQC). BraTS is skull-stripped:
  the background is exactly zero by construction, which is not air noise, so ``fber`` is NaN
  with the reason in ``notes["fber"]``; it is computed only when the background has non-zero
  voxels (an image that was not skull-stripped).
* ``wm2max``: ``median(I over W) / P99.95(I over B)``. Near 1 means the WM sits at the top of
  the range (long right tail from few bright voxels makes it small).

A metric whose class is empty or whose denominator is 0 is NaN, with the reason in ``notes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from aad_med import CHANNELS
from aad_med.data.io import MAX_VOXELS, load_subject
from aad_med.data.records import SubjectRecord

METRICS = (
    "snr_csf",
    "snr_gm",
    "snr_wm",
    "snr_total",
    "cnr",
    "cjv",
    "efc",
    "inu_range",
    "fber",
    "wm2max",
)
"""Keys of :func:`image_quality`'s ``metrics`` dict, in table order."""

CSF, GM, WM = 1, 2, 3


def tissue_classes(
    t1: np.ndarray, mask: np.ndarray, seg: np.ndarray | None = None, n_iter: int = 100
) -> np.ndarray:
    """CSF/GM/WM labels (1/2/3, 0 elsewhere) from a 3-class k-means on T1 intensities.

    Args:
        t1: the T1 volume ``(X, Y, Z)``.
        mask: brain mask, same shape (bool).
        seg: tumour labels (``> 0`` is tumour, left out of every class) or ``None``.
        n_iter: maximum Lloyd iterations (1-D k-means converges in a few).

    Returns:
        ``(X, Y, Z)`` uint8 labels; classes ordered by increasing mean T1 intensity.

    Raises:
        ValueError: shapes differ or fewer than 3 distinct intensities in the mask.
    """
    t1 = np.asarray(t1, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if t1.shape != mask.shape or (seg is not None and np.shape(seg) != t1.shape):
        raise ValueError(f"T1 {t1.shape}, mask {mask.shape} and seg shapes must agree")
    use = mask & (np.asarray(seg) <= 0) if seg is not None else mask
    x = t1[use]
    if np.unique(x).size < 3:
        raise ValueError("fewer than 3 distinct intensities in the brain mask; no tissue classes")
    # Deterministic start at the 1/6, 3/6, 5/6 quantiles (the class medians of equal thirds).
    centres = np.quantile(x, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(n_iter):
        cut = (centres[:-1] + centres[1:]) / 2
        lab = np.searchsorted(cut, x)
        new = np.array([x[lab == c].mean() if np.any(lab == c) else centres[c] for c in range(3)])
        if np.allclose(new, centres, rtol=0, atol=1e-9 * (1 + np.abs(centres).max())):
            break
        centres = np.sort(new)
    out = np.zeros(t1.shape, dtype=np.uint8)
    out[use] = np.searchsorted((centres[:-1] + centres[1:]) / 2, x) + 1
    return out


def _stats(values: np.ndarray) -> tuple[float, float, int]:
    n = int(values.size)
    if n == 0:
        return math.nan, math.nan, 0
    return float(values.mean()), float(values.std()), n


def _ratio(num: float, den: float) -> float:
    if not (math.isfinite(num) and math.isfinite(den)) or den == 0:
        return math.nan
    return num / den


def _efc(x: np.ndarray) -> float:
    x = np.clip(x.astype(np.float64), 0.0, None)
    n = x.size
    b = math.sqrt(float((x * x).sum()))
    if n < 2 or b == 0:
        return math.nan
    y = x[x > 0] / b
    e_max = math.sqrt(n) * math.log(1 / math.sqrt(n))
    return float((y * np.log(y)).sum()) / e_max


class WMSmoothing:
    """The parts of ``inu_range`` every channel of a subject shares: the Gaussian width (from the
    brain mask), the WM mask's bounding box and the smoothed WM indicator ``g_s * 1_W`` at the WM
    voxels. :func:`subject_quality` builds it once for the four channels.

    Only the bounding box of the WM is filtered: ``I·1_W`` and ``1_W`` are zero outside it, and
    ``mode="constant"`` pads with zeros, so every separable pass gives the same float64 values
    at the WM voxels as filtering the whole frame (bit-identical, tested against the full-frame
    computation), on a third of the voxels at BraTS size.
    """

    def __init__(self, mask: np.ndarray, wm: np.ndarray):
        idx = np.argwhere(mask)
        extent = int((idx.max(0) - idx.min(0) + 1).max())
        self.sigma = max(extent / 8.0, 1.0)
        self.wm = wm
        self.box = _bounding_box(wm)
        self.weight = wm[self.box].astype(np.float64)
        self.inside = wm[self.box]
        den = ndimage.gaussian_filter(self.weight, self.sigma, mode="constant")
        self.den = den[self.inside]

    def field(self, image: np.ndarray) -> np.ndarray:
        """``g_s * (I·1_W) / g_s * 1_W`` at the WM voxels (C order)."""
        num = ndimage.gaussian_filter(image[self.box] * self.weight, self.sigma, mode="constant")
        return num[self.inside] / self.den


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _inu_range(
    image: np.ndarray, mask: np.ndarray, wm: np.ndarray, smoothing: WMSmoothing | None = None
) -> float:
    field = (smoothing or WMSmoothing(mask, wm)).field(image)
    med = float(np.median(field))
    if med <= 0:
        return math.nan
    lo, hi = np.percentile(field / med, [5, 95])
    return float(hi - lo)


def image_quality(
    image: np.ndarray,
    mask: np.ndarray,
    tissues: np.ndarray,
    smoothing: WMSmoothing | None = None,
) -> tuple[dict[str, float], dict[str, str]]:
    """The IQMs of one channel (module docstring gives the formulas).

    Args:
        image: raw intensities ``(X, Y, Z)``.
        mask: brain mask (bool), same shape.
        tissues: labels from :func:`tissue_classes` (1 CSF, 2 GM, 3 WM), same shape.
        smoothing: the subject's :class:`WMSmoothing` of ``mask`` and the WM of ``tissues``
            (shared by its channels); built here when ``None``.

    Returns:
        ``(metrics, notes)``: ``metrics`` has every key of :data:`METRICS` (float, NaN when
        undefined); ``notes`` maps a NaN metric to the reason.

    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    img = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    tissues = np.asarray(tissues)
    if img.shape != mask.shape or img.shape != tissues.shape or img.ndim != 3:
        raise ValueError(
            f"image {img.shape}, mask {mask.shape} and tissues {tissues.shape} must be one 3-D grid"
        )
    if not mask.any():
        raise ValueError("the brain mask is empty")
    notes: dict[str, str] = {}
    cls = {c: _stats(img[tissues == c]) for c in (CSF, GM, WM)}
    m: dict[str, float] = {}
    for c, key in ((CSF, "snr_csf"), (GM, "snr_gm"), (WM, "snr_wm")):
        mu, sd, n = cls[c]
        m[key] = _ratio(mu, sd * math.sqrt(n / (n - 1))) if n > 1 else math.nan
    snrs = [m["snr_csf"], m["snr_gm"], m["snr_wm"]]
    m["snr_total"] = float(np.mean(snrs)) if all(map(math.isfinite, snrs)) else math.nan
    (mu_g, sd_g, _), (mu_w, sd_w, n_w) = cls[GM], cls[WM]
    m["cnr"] = _ratio(abs(mu_g - mu_w), math.sqrt(sd_g**2 + sd_w**2))
    m["cjv"] = _ratio(sd_w + sd_g, abs(mu_w - mu_g))
    m["efc"] = _efc(img[mask])
    wm = tissues == WM
    m["inu_range"] = _inu_range(img, mask, wm, smoothing) if n_w > 0 else math.nan
    background = img[~mask]
    if background.size == 0 or not np.any(background != 0):
        m["fber"] = math.nan
        notes["fber"] = (
            "background is exactly zero (skull-stripped): no air noise to compare against"
        )
    else:
        m["fber"] = _ratio(float(np.mean(img[mask] ** 2)), float(np.mean(background**2)))
    top = float(np.percentile(img[mask], 99.95))
    m["wm2max"] = _ratio(float(np.median(img[wm])), top) if n_w > 0 else math.nan
    for key, value in m.items():
        if not math.isfinite(value) and key not in notes:
            notes[key] = "undefined: empty tissue class or zero denominator"
    return m, notes


def subject_quality(
    record: SubjectRecord, max_voxels: int = MAX_VOXELS
) -> tuple[dict[str, float], dict[str, str]]:
    """IQMs of every channel of one subject, read from disk with the project's loader.

    The brain mask is the union of non-zero voxels over channels; tissue classes come from the
    subject's T1 (tumour labels excluded when the subject has a segmentation).

    Args:
        record: the subject.
        max_voxels: header size limit passed to :func:`aad_med.data.io.load_subject`.

    Returns:
        ``(metrics, notes)`` keyed ``"{channel}_{metric}"`` (e.g. ``"t1_snr_wm"``), channels in
        :data:`aad_med.CHANNELS` order.

    Raises:
        InputError: a file cannot be read (named by the loader).
        ValueError: the brain mask is empty or has fewer than 3 distinct T1 values.
    """
    loaded = load_subject(record, max_voxels=max_voxels)
    return quality_of_arrays(loaded.image, loaded.seg)


def quality_of_arrays(
    image: np.ndarray, seg: np.ndarray | None
) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`subject_quality` of a subject already in memory (the arrays
    :func:`aad_med.data.io.load_subject` returns), so a stage that decoded the volumes for
    another purpose (the embedding) does not read them again.

    Args:
        image: ``(4, X, Y, Z)`` raw intensities in :data:`aad_med.CHANNELS` order.
        seg: ``(X, Y, Z)`` tumour labels, or ``None``.

    Raises:
        ValueError: as :func:`subject_quality`.
    """
    mask = np.any(image != 0, axis=0)
    tissues = tissue_classes(image[CHANNELS.index("t1")], mask, seg)
    wm = tissues == WM
    smoothing = WMSmoothing(mask, wm) if mask.any() and wm.any() else None
    metrics, notes = {}, {}
    for c, ch in enumerate(CHANNELS):
        m, n = image_quality(image[c], mask, tissues, smoothing)
        metrics.update({f"{ch}_{k}": v for k, v in m.items()})
        notes.update({f"{ch}_{k}": v for k, v in n.items()})
    return metrics, notes


QUALITY_COLUMNS = tuple(f"{ch}_{k}" for ch in CHANNELS for k in METRICS)
"""Columns of a subject's IQM row (:func:`quality_row`, :func:`cohort_quality`)."""


def quality_row(image: np.ndarray, seg: np.ndarray | None) -> tuple[np.ndarray, str | None]:
    """A subject's IQMs as one float64 row in :data:`QUALITY_COLUMNS` order, from arrays in
    memory (:func:`quality_of_arrays`).

    Returns:
        ``(row, problem)``: all NaN with the reason when the metrics are undefined (empty brain
        mask, too few T1 values), else ``problem`` is ``None``.
    """
    try:
        metrics, _ = quality_of_arrays(image, seg)
    except ValueError as e:
        return np.full(len(QUALITY_COLUMNS), np.nan), str(e)
    return np.array([metrics[c] for c in QUALITY_COLUMNS], dtype=np.float64), None


def cohort_quality(
    records: Sequence[SubjectRecord], max_voxels: int = MAX_VOXELS
) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    """:func:`subject_quality` of every subject, as one table.

    Returns:
        ``(columns, values, notes)``: column names ``"{channel}_{metric}"``, a
        ``(n_subjects, n_columns)`` float64 array (NaN where undefined) and each subject's notes.

    Raises:
        InputError, ValueError: as :func:`subject_quality` (the subject is named by the loader).
    """
    columns = list(QUALITY_COLUMNS)
    values = np.full((len(records), len(columns)), np.nan)
    notes = []
    for i, rec in enumerate(records):
        m, n = subject_quality(rec, max_voxels)
        values[i] = [m[c] for c in columns]
        notes.append(n)
    return columns, values, notes
