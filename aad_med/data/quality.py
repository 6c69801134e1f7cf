"""Stage 1, data: MRIQC-style image-quality metrics (IQMs) of one subject's raw images.

Computed on the raw voxels (before resampling or normalisation) of skull-stripped BraTS-style
data. Pure numpy/scipy on arrays, plus :func:`subject_quality`, which reads one subject through
:func:`aad_med.data.io.load_subject`. No statistics across subjects and no file writing here.

Sampling grid. A subject's metrics (:func:`quality_of_arrays`, :func:`subject_quality`) are
computed on every ``k``-th voxel along each axis, ``k`` the smallest stride whose grid holds at
most :data:`SAMPLE_VOXELS` (2²¹) voxels (:func:`sample_stride`): ``k = 1``, every voxel, up to
128³; ``k = 2`` at BraTS size (1/8 of the voxels, 2 mm apart). Every formula below is then
over the grid's voxels (masks, classes, means, percentiles), except that EFC counts each grid
voxel ``k³`` times (its sums and ``N``), so it estimates the full volume's value. Against every
voxel (BraTS-size synthetic subjects of six sites and a bias-field sweep, BraTS-size phantoms,
the MNI152 T1 under four bias fields; BENCHMARKS.md "Encoding at BraTS size"): SNR, CNR, CJV
and WM2MAX within 1.4 %, EFC within 0.015 %, ``inu_range`` within 0.0013 (up to 13 % of
near-flat fields' 0.002-0.01; at most 1.9 % over the sweep's bias fields, ordered the same).
A BraTS subject's 40 metrics cost 0.06-0.1 s instead of 3.5-5 s on one core.
:func:`image_quality` and :func:`tissue_classes` use every voxel they are given.

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
* ``inu_range``: an intensity non-uniformity (bias field) measure without N4 (our own
  estimate, not MRIQC's N4 field). The field is the WM intensity smoothed by normalised
  convolution, ``F = g_s * (I·1_W) / g_s * 1_W`` with a Gaussian ``g_s`` of ``s`` = 1/8 of the
  brain's largest bounding-box edge (voxels, so it is scale-free), divided by its median over
  ``W``; ``inu_range`` is its 95th minus 5th percentile over ``W`` (like MRIQC's ``inu_range``
  on its N4 field). 0 for a flat field; larger is worse. The convolution runs on a coarse grid
  (:class:`WMSmoothing`: blocks of ``f = ⌊s/4⌋`` voxels, the Gaussian narrowed by the blocks'
  own blur, trilinear read-back at the WM voxels); ``f = 1``, exact, when ``s < 8`` (a brain
  under 64 voxels across). Against the exact full-frame convolution on every voxel: within 1.1 %
  (0.0016) on synthetic subjects, BraTS-size phantoms and the MNI152 T1, same order of
  bias-field severities.
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
from itertools import product

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

QUALITY_VERSION = 2
"""Bumped whenever a metric's values change (2: the sampling grid and ``inu_range`` on the coarse
grid); the embedding's caches hold it in their keys, so rows of another definition are never
read back."""

CSF, GM, WM = 1, 2, 3

SAMPLE_VOXELS = 2**21
"""Largest sampling grid of :func:`quality_of_arrays` (voxels per channel; module docstring)."""

COARSE_TAPS = 4.0
"""The INU field's coarse grid: blocks of ``f = max(1, floor(s / COARSE_TAPS))`` voxels per edge,
so the Gaussian keeps at least ``COARSE_TAPS`` coarse cells per standard deviation."""


def _quantiles_of_sorted(xs: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.quantile(xs, q)`` (method ``linear``) of an already sorted 1-D array: the same
    positions and the same interpolation formula, without numpy's copy and partition."""
    n = xs.size
    pos = np.asarray(q, dtype=np.float64) * (n - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    t = pos - lo
    a = xs[lo].astype(np.float64)
    b = xs[hi].astype(np.float64)
    d = b - a
    return np.where(t >= 0.5, b - d * (1 - t), a + d * t)


def _percentiles_of_sorted(xs: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """``np.percentile(xs, q)`` of an already sorted 1-D array (see :func:`_quantiles_of_sorted`)."""
    return _quantiles_of_sorted(xs, np.asarray(q, dtype=np.float64) / 100)


def _kmeans_cuts(x: np.ndarray, n_iter: int) -> np.ndarray:
    """The two class boundaries of a 3-class 1-D k-means (Lloyd) of ``x``.

    Exact Lloyd iterations on the sorted values: a class is a contiguous run of the sorted
    array, so each iteration is two binary searches and three differences of a cumulative sum
    instead of a pass over every voxel.
    """
    xs = np.sort(np.asarray(x, dtype=np.float64))
    n = xs.size
    if n == 0 or np.searchsorted(xs, xs[0], "right") >= np.searchsorted(xs, xs[-1], "left"):
        raise ValueError("fewer than 3 distinct intensities in the brain mask; no tissue classes")
    csum = np.zeros(n + 1)
    np.cumsum(xs, out=csum[1:])
    # Deterministic start at the 1/6, 3/6, 5/6 quantiles (the class medians of equal thirds).
    centres = _quantiles_of_sorted(xs, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(n_iter):
        cut = (centres[:-1] + centres[1:]) / 2
        edges = [0, *np.searchsorted(xs, cut, "right").tolist(), n]
        new = np.array(
            [
                (csum[e1] - csum[e0]) / (e1 - e0) if e1 > e0 else centres[c]
                for c, (e0, e1) in enumerate(zip(edges[:-1], edges[1:], strict=True))
            ]
        )
        if np.allclose(new, centres, rtol=0, atol=1e-9 * (1 + np.abs(centres).max())):
            break
        centres = np.sort(new)
    return (centres[:-1] + centres[1:]) / 2


def _classify(x: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    """Labels 1/2/3 of ``x`` against the two k-means boundaries (a value on a cut goes below)."""
    lab = (x > cuts[0]).astype(np.uint8)
    lab += x > cuts[1]
    lab += 1
    return lab


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
    t1 = np.asarray(t1)
    mask = np.asarray(mask, dtype=bool)
    if t1.shape != mask.shape or (seg is not None and np.shape(seg) != t1.shape):
        raise ValueError(f"T1 {t1.shape}, mask {mask.shape} and seg shapes must agree")
    use = mask & (np.asarray(seg) <= 0) if seg is not None else mask
    index = np.flatnonzero(use)
    x = np.ravel(t1).take(index).astype(np.float64)
    out = np.zeros(t1.shape, dtype=np.uint8)
    out.ravel()[index] = _classify(x, _kmeans_cuts(x, n_iter))
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


def _efc(x: np.ndarray, scale: int = 1) -> float:
    """EFC of the brain values ``x``; on a sampling grid each value stands for ``scale`` voxels
    (every sum and ``N`` are multiplied by it)."""
    n = x.size * scale
    pos = x[x > 0].astype(np.float64, copy=False)  # clipped to 0, the rest adds nothing
    b = math.sqrt(scale * float(np.dot(pos, pos)))
    if n < 2 or b == 0:
        return math.nan
    # sum (x/b) ln(x/b) = (sum x ln x - ln b sum x) / b: one pass of logarithms, no division
    e = scale * (float(np.dot(pos, np.log(pos))) - math.log(b) * float(pos.sum())) / b
    return e / (math.sqrt(n) * math.log(1 / math.sqrt(n)))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every true voxel of a non-empty ``mask``."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def inu_sigma(mask: np.ndarray) -> float:
    """The INU field's Gaussian width ``s``: 1/8 of the brain mask's largest bounding-box edge
    (voxels), at least 1."""
    extent = max(sl.stop - sl.start for sl in _bounding_box(mask))
    return max(extent / 8.0, 1.0)


class WMSmoothing:
    """The INU field ``F = g_s * (I·1_W) / g_s * 1_W`` at the WM voxels, on a coarse grid.

    Built once per subject (the WM voxels, the grid, the smoothed WM indicator) and shared by its
    channels. The WM voxels' bounding box is cut into blocks of ``f`` voxels per edge
    (:data:`COARSE_TAPS`); ``I·1_W`` and ``1_W`` are summed per block, smoothed on the block grid
    by a Gaussian of ``sqrt(s² − (f² − 1)/12) / f`` blocks (the block sum already blurs by a box
    of variance ``(f² − 1)/12``), zero outside the grid (one empty block of margin each side),
    and both read back at every WM voxel by trilinear interpolation between block centres before
    the division. With ``f = 1`` (``s < 2·COARSE_TAPS``: small volumes) this is the exact
    normalised convolution of the full frame, bit for bit.

    Args:
        shape: the volume's shape.
        wm_index: flat (C-order) indices of the WM voxels, ascending, not empty.
        sigma: the Gaussian width ``s`` in voxels (:func:`inu_sigma`).
    """

    def __init__(self, shape: tuple[int, ...], wm_index: np.ndarray, sigma: float):
        self.sigma = float(sigma)
        self.factor = f = max(1, int(self.sigma // COARSE_TAPS))
        self.coarse_sigma = math.sqrt(max(self.sigma**2 - (f * f - 1) / 12, 0.0)) / f
        # Per-axis voxel coordinates relative to the WM box; every per-voxel quantity below
        # depends on one axis' coordinate only, so it is a lookup in a table of the box's edge.
        rel, blocks, lower, upper = [], [], [], []
        stride = math.prod(shape)
        rest = np.asarray(wm_index, dtype=np.intp)
        for n in shape:
            stride //= n
            coord, rest = np.divmod(rest, stride) if stride > 1 else (rest, None)
            low = int(coord.min())
            rel.append(coord - low)
            r = np.arange(int(coord.max()) - low + 1)
            blocks.append(r // f + 1)  # +1: one empty margin block before the box
            # Block k's centre is voxel k·f + (f − 1)/2 of the box (+1 for the margin block).
            u = (r - (f - 1) / 2) / f + 1
            lower.append(np.floor(u).astype(np.intp))
            upper.append(u - np.floor(u))
        self.grid = tuple(int(b[-1]) + 2 for b in blocks)
        self.size = math.prod(self.grid)
        gy, gz = self.grid[1], self.grid[2]
        b = [t[r] for t, r in zip(blocks, rel, strict=True)]
        self.block = (b[0] * gy + b[1]) * gz + b[2]
        if f == 1:
            self.corners, self.weights = None, None
        else:
            i0 = [t[r] for t, r in zip(lower, rel, strict=True)]
            base = (i0[0] * gy + i0[1]) * gz + i0[2]
            w = [t[r] for t, r in zip(upper, rel, strict=True)]
            pairs = [(1 - wa, wa) for wa in w]
            corners = list(product((0, 1), repeat=3))
            offsets = np.array([(dx * gy + dy) * gz + dz for dx, dy, dz in corners])
            self.corners = base[None, :] + offsets[:, None]
            xy = {(dx, dy): pairs[0][dx] * pairs[1][dy] for dx, dy in product((0, 1), repeat=2)}
            self.weights = np.stack([xy[dx, dy] * pairs[2][dz] for dx, dy, dz in corners])
        counts = np.bincount(self.block, minlength=self.size).astype(np.float64)
        self.den = self._smooth_at_wm(counts)

    def _smooth_at_wm(self, block_sums: np.ndarray) -> np.ndarray:
        smooth = ndimage.gaussian_filter(
            block_sums.reshape(self.grid), self.coarse_sigma, mode="constant"
        ).ravel()
        if self.corners is None:
            return smooth[self.block]
        return np.einsum("ij,ij->j", smooth[self.corners], self.weights)

    def field(self, wm_values: np.ndarray) -> np.ndarray:
        """``F`` at the WM voxels (C order), from the image's values at those voxels (C order)."""
        sums = np.bincount(
            self.block, weights=np.asarray(wm_values, np.float64), minlength=self.size
        )
        return self._smooth_at_wm(sums) / self.den


class _Brain:
    """One subject's brain voxels as its channels' metrics need them: flat indices grouped by
    class (unclassified, CSF, GM, WM; C order within a group, so a group's values are exactly
    ``I[tissues == c]``), the shared INU smoothing, and whether the background is known to be
    zero (a mask made of the non-zero voxels)."""

    def __init__(
        self,
        mask: np.ndarray,
        index: np.ndarray,
        labels: np.ndarray,
        smoothing: WMSmoothing | None,
        zero_background: bool,
        scale: int = 1,
    ):
        groups = [index[labels == c] for c in (0, CSF, GM, WM)]
        self.mask = mask
        self.index = np.concatenate(groups)
        self.bounds = np.cumsum([0, *(g.size for g in groups)])
        wm = groups[-1]
        if smoothing is None and wm.size:
            smoothing = WMSmoothing(mask.shape, wm, inu_sigma(mask))
        self.smoothing = smoothing
        self.zero_background = zero_background
        self.scale = scale

    def group(self, values: np.ndarray, c: int) -> np.ndarray:
        return values[self.bounds[c] : self.bounds[c + 1]]


def _flat(volume: np.ndarray) -> np.ndarray:
    return volume.reshape(-1)  # a view of a C-contiguous channel, a copy otherwise


def _channel_quality(image: np.ndarray, brain: _Brain) -> tuple[dict[str, float], dict[str, str]]:
    flat = _flat(image)
    raw = flat.take(brain.index)
    x = raw.astype(np.float64)
    notes: dict[str, str] = {}
    cls = {c: _stats(brain.group(x, c)) for c in (CSF, GM, WM)}
    m: dict[str, float] = {}
    for c, key in ((CSF, "snr_csf"), (GM, "snr_gm"), (WM, "snr_wm")):
        mu, sd, n = cls[c]
        m[key] = _ratio(mu, sd * math.sqrt(n / (n - 1))) if n > 1 else math.nan
    snrs = [m["snr_csf"], m["snr_gm"], m["snr_wm"]]
    m["snr_total"] = float(np.mean(snrs)) if all(map(math.isfinite, snrs)) else math.nan
    (mu_g, sd_g, _), (mu_w, sd_w, n_w) = cls[GM], cls[WM]
    m["cnr"] = _ratio(abs(mu_g - mu_w), math.sqrt(sd_g**2 + sd_w**2))
    m["cjv"] = _ratio(sd_w + sd_g, abs(mu_w - mu_g))
    m["efc"] = _efc(x, brain.scale)
    wm = brain.group(x, WM)
    m["inu_range"] = math.nan
    if n_w > 0:
        p5, med, p95 = _percentiles_of_sorted(np.sort(brain.smoothing.field(wm)), [5, 50, 95])
        m["inu_range"] = float((p95 - p5) / med) if med > 0 else math.nan
    if brain.zero_background or np.count_nonzero(flat) == np.count_nonzero(raw):
        m["fber"] = math.nan
        notes["fber"] = (
            "background is exactly zero (skull-stripped): no air noise to compare against"
        )
    else:
        background = _flat(brain.mask) == 0
        m["fber"] = _ratio(float(np.mean(x**2)), float(np.mean(flat[background] ** 2.0)))
    top = float(_percentiles_of_sorted(np.sort(raw), [99.95])[0])
    median_wm = float(_percentiles_of_sorted(np.sort(wm), [50])[0]) if n_w > 0 else math.nan
    m["wm2max"] = _ratio(median_wm, top)
    for key, value in m.items():
        if not math.isfinite(value) and key not in notes:
            notes[key] = "undefined: empty tissue class or zero denominator"
    return m, notes


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
        tissues: labels from :func:`tissue_classes` (1 CSF, 2 GM, 3 WM; only voxels of the
            mask count), same shape.
        smoothing: the subject's :class:`WMSmoothing` of the WM of ``tissues`` (shared by its
            channels); built here when ``None``.

    Returns:
        ``(metrics, notes)``: ``metrics`` has every key of :data:`METRICS` (float, NaN when
        undefined); ``notes`` maps a NaN metric to the reason.

    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    tissues = np.asarray(tissues)
    if image.shape != mask.shape or image.shape != tissues.shape or image.ndim != 3:
        raise ValueError(
            f"image {image.shape}, mask {mask.shape} and tissues {tissues.shape} must be one "
            "3-D grid"
        )
    index = np.flatnonzero(mask)
    if index.size == 0:
        raise ValueError("the brain mask is empty")
    labels = _flat(tissues).take(index)
    labels = np.where(np.isin(labels, (CSF, GM, WM)), labels, 0)
    return _channel_quality(image, _Brain(mask, index, labels, smoothing, False))


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


def sample_stride(shape: Sequence[int], max_voxels: int = SAMPLE_VOXELS) -> int:
    """The smallest stride ``s >= 1`` whose grid (every ``s``-th voxel along each axis) holds at
    most ``max_voxels`` voxels: 1 up to 128³, 2 for a BraTS volume (240×240×155)."""
    s = 1
    while math.prod(-(-int(n) // s) for n in shape) > max_voxels:
        s += 1
    return s


def quality_of_arrays(
    image: np.ndarray, seg: np.ndarray | None, n_iter: int = 100, stride: int | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """:func:`subject_quality` of a subject already in memory (the arrays
    :func:`aad_med.data.io.load_subject` returns), so a stage that decoded the volumes for
    another purpose (the embedding) does not read them again.

    Args:
        image: ``(4, X, Y, Z)`` raw intensities in :data:`aad_med.CHANNELS` order.
        seg: ``(X, Y, Z)`` tumour labels, or ``None``.
        n_iter: maximum Lloyd iterations of the tissue classes (:func:`tissue_classes`).
        stride: the sampling grid's stride (module docstring); ``None``:
            :func:`sample_stride` of the volume.

    Raises:
        ValueError: as :func:`subject_quality`.
    """
    s = sample_stride(image.shape[1:]) if stride is None else int(stride)
    if s > 1:
        try:
            return _quality_on_grid(
                np.ascontiguousarray(image[:, ::s, ::s, ::s]),
                None if seg is None else np.ascontiguousarray(seg[::s, ::s, ::s]),
                n_iter,
                s**3,
            )
        except ValueError:  # a brain too small for the grid: the full grid decides
            pass
    return _quality_on_grid(image, seg, n_iter, 1)


def _quality_on_grid(
    image: np.ndarray, seg: np.ndarray | None, n_iter: int, scale: int
) -> tuple[dict[str, float], dict[str, str]]:
    mask = image[0] != 0
    for channel in image[1:]:
        mask |= channel != 0
    index = np.flatnonzero(mask)
    if index.size == 0:
        raise ValueError("the brain mask is empty")
    t1 = _flat(image[CHANNELS.index("t1")]).take(index).astype(np.float64)
    labels = np.zeros(index.size, dtype=np.uint8)
    if seg is None:
        labels[:] = _classify(t1, _kmeans_cuts(t1, n_iter))
    else:
        use = _flat(np.asarray(seg)).take(index) <= 0
        x = t1[use]
        labels[use] = _classify(x, _kmeans_cuts(x, n_iter))
    # The mask is the non-zero voxels, so the background is zero in every channel.
    brain = _Brain(mask, index, labels, None, zero_background=True, scale=scale)
    metrics, notes = {}, {}
    for c, ch in enumerate(CHANNELS):
        m, n = _channel_quality(image[c], brain)
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
