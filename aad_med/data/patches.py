"""Patch stage: preprocessed subjects -> cubic 3D patches, random ones for training and a
deterministic grid for evaluation.

The random part (:func:`train_transforms`) samples cubic patches with a minimum brain fraction,
optionally centred on tumour voxels, plus light augmentation. Its per-subject look-up tables
(brain integral image, brain and tumour voxel indices) depend only on the subject:
:class:`AddSamplingIndexd` computes them in the deterministic part, so a cached dataset builds
them once instead of every epoch (keys :data:`SAMPLING_KEYS`). :func:`eval_patch_grid` cuts the
deterministic evaluation grid used to embed a whole subject.

Inputs are the preprocessed subject dicts of :mod:`aad_med.data.transforms`
(:data:`~aad_med.data.transforms.PREPROCESSED_KEYS`); this module reads and writes no files.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    MaskIntensityd,
    RandFlipd,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.transforms import SafeCompose, plain_tensor

PATCH_KEYS = ("subject_id", "image", "seg", "brain", "has_seg", "patch_start", "patch_tumour")
"""Keys of one training patch dict (output of :func:`train_transforms`):
``image`` ``(4, p, p, p)`` float32, ``seg`` ``(1, p, p, p)`` int16, ``brain`` ``(1, p, p, p)``
uint8, ``patch_start`` ``(3,)`` int64 (corner in the preprocessed volume), ``patch_tumour`` bool
(patch was centred on a seg > 0 voxel), plus ``subject_id`` and ``has_seg``."""

SAMPLING_KEYS = ("brain_integral", "brain_index", "tumour_index")
"""Keys added by :class:`AddSamplingIndexd` and read by :class:`RandBrainPatchd`:

- ``brain_integral``: ``(X+1, Y+1, Z+1)`` int32 (int64 beyond 2³¹ voxels) zero-padded 3D
  cumulative sum of ``brain``, so any box's brain count is 8 look-ups
- ``brain_index``: ``(N,)`` int32/int64 flat (C-order) indices of the brain voxels, ascending
- ``tumour_index``: ``(M,)`` flat indices of the seg > 0 voxels, ascending (empty without seg)

At BraTS size they add about a third to a cached subject's memory (the integral is the size of
one int32 channel)."""

DEFAULT_AUGMENT = {
    "flip_prob": 0.5,
    "intensity_prob": 0.5,
    "intensity_scale": 0.1,
    "intensity_shift": 0.1,
}
"""A light augmentation for ``train_transforms(augment=...)``: random flips along each axis,
per-channel intensity scale ``1 +- 0.1`` and shift ``+- 0.1`` (in z-score units) inside the brain."""

_SAMPLE_TRIES = 32


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _integral(brain: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3D cumulative sum: ``S[i, j, k]`` = brain voxels in ``[:i, :j, :k]``.

    int32 when the volume has fewer than 2³¹ voxels (no count can overflow), else int64.
    """
    dtype = _index_dtype(brain.numel())
    b = (brain.reshape(brain.shape[-3:]) > 0).to(dtype)
    s = b.cumsum(0, dtype=dtype).cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
    return torch.nn.functional.pad(s, (1, 0, 1, 0, 1, 0))


def _flat_index(mask: torch.Tensor) -> torch.Tensor:
    """Ascending flat (C-order) indices of the non-zero voxels of ``mask``."""
    flat = mask.reshape(-1)
    return flat.nonzero()[:, 0].to(_index_dtype(flat.numel()))


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(N,)`` flat C-order indices of a volume of ``shape`` -> ``(N, 3)`` int64 voxel indices."""
    f = flat.to(torch.int64)
    _, y, z = (int(s) for s in shape)
    return torch.stack([f // (y * z), (f // z) % y, f % z], dim=1)


def sampling_index(
    brain: torch.Tensor, seg: torch.Tensor | None = None, has_seg: bool = True
) -> dict[str, torch.Tensor]:
    """The per-subject look-up tables of :class:`RandBrainPatchd` (keys :data:`SAMPLING_KEYS`).

    Args:
        brain: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` mask (non-zero = brain).
        seg: segmentation of the same volume, or ``None``.
        has_seg: ``False`` when ``seg`` is a placeholder (no tumour index is built).

    Returns:
        ``brain_integral``, ``brain_index``, ``tumour_index`` as CPU tensors.
    """
    brain = plain_tensor(brain).cpu()
    shape = tuple(brain.shape[-3:])
    b = brain.reshape(shape) > 0
    if seg is not None and has_seg:
        tumour = _flat_index(plain_tensor(seg).cpu().reshape(shape) > 0)
    else:
        tumour = torch.zeros(0, dtype=_index_dtype(b.numel()))
    return {"brain_integral": _integral(b), "brain_index": _flat_index(b), "tumour_index": tumour}


def _box_counts(integral: torch.Tensor, starts: torch.Tensor, size: int) -> torch.Tensor:
    """Brain voxels in the cubes ``[s, s + size)`` for every row ``s`` of ``starts`` (N, 3)."""
    x0, y0, z0 = starts.unbind(1)
    x1, y1, z1 = x0 + size, y0 + size, z0 + size
    s = integral
    return (
        s[x1, y1, z1]
        - s[x0, y1, z1]
        - s[x1, y0, z1]
        - s[x1, y1, z0]
        + s[x0, y0, z1]
        + s[x0, y1, z0]
        + s[x1, y0, z0]
        - s[x0, y0, z0]
    )


def _grid_starts(size: int, patch_size: int, stride: int) -> list[int]:
    last = size - patch_size
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def _grid_positions(
    shape: Sequence[int], patch_size: int, stride: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``(N, 3)`` start corners of the full grid (x-major order), last patch aligned to the end."""
    axes = [torch.tensor(_grid_starts(s, patch_size, stride), device=device) for s in shape]
    return torch.cartesian_prod(*axes).reshape(-1, 3)


def _window_sums(values: np.ndarray, starts: list[int], size: int, axis: int) -> np.ndarray:
    """Sums of ``values`` over ``[s, s + size)`` along ``axis`` for every ``s`` in ``starts``:
    one ``np.add.reduceat`` over the segments between the windows' edges, then prefix sums of
    those few segments (the windows' axis shrinks to ``len(starts)``)."""
    length = values.shape[axis]
    edges = sorted(set(starts) | {s + size for s in starts})
    bounds = [0] + [e for e in edges if 0 < e < length]
    segments = np.add.reduceat(values, bounds, axis=axis, dtype=np.int64)
    prefix = np.cumsum(segments, axis=axis)
    zero = np.zeros_like(np.take(prefix, [0], axis=axis))
    prefix = np.concatenate([zero, prefix], axis=axis)  # prefix[k]: sum before the k-th edge
    where = {e: k for k, e in enumerate([0, *bounds[1:], length])}
    return np.take(prefix, [where[s + size] for s in starts], axis=axis) - np.take(
        prefix, [where[s] for s in starts], axis=axis
    )


def _grid_counts(mask: np.ndarray, axes: list[list[int]], size: int) -> np.ndarray:
    """Brain voxels of every grid cube (starts ``axes[0] x axes[1] x axes[2]``, edge ``size``)
    of the ``(X, Y, Z)`` bool ``mask``: window sums axis by axis. One pass over the volume
    instead of :func:`_integral`'s three cumulative sums and a padded copy (about 3x faster at
    BraTS size); the same counts."""
    counts = mask
    for axis, starts in enumerate(axes):
        counts = _window_sums(counts, starts, size, axis)
    return counts


def eval_patch_positions(
    brain: torch.Tensor, patch_size: int, stride: int, min_brain_fraction: float
) -> torch.Tensor:
    """Start corners of the evaluation grid patches kept for a subject.

    The grid starts at 0 with step ``stride`` along each axis, the last patch aligned to the end
    of the volume, so it covers every voxel. Patches with a brain fraction below
    ``min_brain_fraction`` are dropped, but the patch with the most brain is always kept.

    Args:
        brain: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` mask (non-zero = brain), CPU or CUDA.
        patch_size: cube edge ``p``.
        stride: grid step (``p`` for non-overlapping patches).
        min_brain_fraction: minimum share of brain voxels in a kept patch.

    Returns:
        ``(N, 3)`` int64 positions on the device of ``brain``, in grid (x-major) order, ``N >= 1``.

    Raises:
        ValueError: the volume is smaller than the patch, or ``stride < 1``.
    """
    shape = tuple(brain.shape[-3:])
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if any(s < patch_size for s in shape):
        raise ValueError(f"volume {shape} is smaller than the patch size {patch_size}")
    axes = [_grid_starts(s, patch_size, stride) for s in shape]
    starts = torch.cartesian_prod(*(torch.tensor(a, device=brain.device) for a in axes))
    if brain.device.type == "cpu":
        mask = (plain_tensor(brain).reshape(shape) > 0).numpy()
        counts = torch.from_numpy(_grid_counts(mask, axes, patch_size).reshape(-1))
    else:
        counts = _box_counts(_integral(brain), starts, patch_size)
    keep = counts >= min_brain_fraction * patch_size**3
    if not bool(keep.any()):
        keep = torch.zeros_like(keep)
        keep[counts.argmax()] = True
    return starts[keep].to(torch.int64)


def extract_patches(image: torch.Tensor, positions: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut cubes of edge ``patch_size`` at ``positions`` (N, 3) from ``image`` (C, X, Y, Z).

    Returns:
        ``(N, C, p, p, p)`` on the device of ``image`` (a copy, not a view).
    """
    p = patch_size
    starts = positions.to("cpu", torch.int64).tolist()
    if not starts:
        return image.new_empty((0, image.shape[0], p, p, p))
    # One slice copy per patch: 10-20x faster than one advanced-indexing gather on CPU.
    out = image.new_empty((len(starts), image.shape[0], p, p, p))
    for i, (x, y, z) in enumerate(starts):
        out[i] = image[:, x : x + p, y : y + p, z : z + p]
    return out


def eval_patch_grid(
    image: torch.Tensor,
    brain: torch.Tensor,
    patch_size: int,
    stride: int,
    min_brain_fraction: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The deterministic evaluation grid of patches covering a subject's brain.

    For large grids (small stride, big volumes) use :func:`eval_patch_positions` and
    :func:`extract_patches` in batches instead, to bound memory.

    Args:
        image: ``(4, X, Y, Z)`` preprocessed volume (CPU or CUDA).
        brain: ``(1, X, Y, Z)`` brain mask of the same volume.
        patch_size: cube edge ``p``.
        stride: grid step.
        min_brain_fraction: minimum share of brain voxels in a kept patch.

    Returns:
        ``(patches, positions)``: ``(N, 4, p, p, p)`` and ``(N, 3)`` int64 start corners, ``N >= 1``.
    """
    if tuple(image.shape[-3:]) != tuple(brain.shape[-3:]):
        raise ValueError(f"image {tuple(image.shape)} and brain {tuple(brain.shape)} differ")
    positions = eval_patch_positions(brain.to(image.device), patch_size, stride, min_brain_fraction)
    return extract_patches(image, positions, patch_size), positions


class AddSamplingIndexd(MapTransform):
    """Deterministic: add the look-up tables of :class:`RandBrainPatchd` (:data:`SAMPLING_KEYS`).

    They depend only on the subject, so appending this transform to the cached (deterministic)
    part lets every epoch after the first skip them (at BraTS size, ~60 ms for the integral
    image and ~65 ms for the brain voxel indices per subject and epoch otherwise).
    """

    def __init__(self, brain_key: str = "brain", seg_key: str = "seg"):
        super().__init__(keys=[brain_key])
        self.brain_key = brain_key
        self.seg_key = seg_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        d.update(
            sampling_index(d[self.brain_key], d.get(self.seg_key), bool(d.get("has_seg", True)))
        )
        return d


class RandBrainPatchd(Randomizable, MapTransform):
    """Random cubic patches with at least ``min_brain_fraction`` brain, tumour-aware.

    Each of the ``num_samples`` patches is, with probability ``tumour_ratio`` when the subject has
    a non-empty seg, centred on a random seg > 0 voxel, otherwise on a random brain voxel. Centres
    are drawn in batches of candidates; the first whose (clipped) patch holds enough brain wins.
    If none does, a random admissible position of a fine grid is used, and if there is none, the
    position with the most brain.

    The brain integral image and the brain and tumour voxel indices are read from the input
    (:data:`SAMPLING_KEYS`, added by :class:`AddSamplingIndexd` in the cached part) when present
    and consistent with ``brain``, else computed here. Both give the same patches for a seed.

    Returns a list of ``num_samples`` dicts (keys :data:`PATCH_KEYS`).
    """

    def __init__(
        self,
        patch_size: int,
        num_samples: int,
        min_brain_fraction: float,
        tumour_ratio: float = 0.3,
        keys: KeysCollection = ("image", "seg", "brain"),
        brain_key: str = "brain",
        seg_key: str = "seg",
        max_tries: int = _SAMPLE_TRIES,
    ):
        MapTransform.__init__(self, keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 <= tumour_ratio <= 1.0:
            raise ValueError(f"tumour_ratio must be in [0, 1], got {tumour_ratio}")
        self.patch_size = int(patch_size)
        self.num_samples = int(num_samples)
        self.min_brain_fraction = float(min_brain_fraction)
        self.tumour_ratio = float(tumour_ratio)
        self.brain_key = brain_key
        self.seg_key = seg_key
        self.max_tries = int(max_tries)

    def randomize(self, data=None) -> None:
        # Sampling draws from self.R inside __call__; nothing to pre-draw.
        return None

    def _draw_centres(self, flat: torch.Tensor, shape: Sequence[int], n: int) -> torch.Tensor:
        idx = torch.from_numpy(self.R.randint(0, flat.shape[0], size=n))
        return _unravel(flat[idx], shape)

    def _pick(self, centres, integral, shape, need) -> torch.Tensor | None:
        p = self.patch_size
        hi = torch.tensor(shape) - p
        starts = (centres - p // 2).clamp(min=torch.zeros(3, dtype=hi.dtype), max=hi)
        ok = _box_counts(integral, starts, p) >= need
        if bool(ok.any()):
            return starts[int(ok.nonzero()[0, 0])]
        return None

    def _fallback(self, integral, shape, need) -> torch.Tensor:
        positions = _grid_positions(shape, self.patch_size, max(1, self.patch_size // 8))
        counts = _box_counts(integral, positions, self.patch_size)
        ok = (counts >= need).nonzero()[:, 0]
        if ok.numel():
            return positions[int(ok[self.R.randint(ok.numel())])]
        return positions[int(counts.argmax())]

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict]:
        d = dict(data)
        p = self.patch_size
        brain = torch.as_tensor(d[self.brain_key]).cpu()
        shape = tuple(brain.shape[-3:])
        if any(s < p for s in shape):
            raise ValueError(f"volume {shape} is smaller than the patch size {p}")
        index = self._sampling_index(d, brain, shape)
        integral = index["brain_integral"]
        need = self.min_brain_fraction * p**3
        brain_flat = index["brain_index"]
        tumour_flat = index["tumour_index"] if index["tumour_index"].numel() else None
        out = []
        for _ in range(self.num_samples):
            tumour = tumour_flat is not None and self.R.rand() < self.tumour_ratio
            start = None
            if tumour:
                centres = self._draw_centres(tumour_flat, shape, self.max_tries)
                start = self._pick(centres, integral, shape, need)
                tumour = start is not None
            if start is None and brain_flat.shape[0]:
                centres = self._draw_centres(brain_flat, shape, self.max_tries)
                start = self._pick(centres, integral, shape, need)
            if start is None:
                start = self._fallback(integral, shape, need)
            out.append(self._crop(d, start.to(torch.int64), tumour))
        return out

    def _sampling_index(self, d: dict, brain: torch.Tensor, shape) -> dict[str, torch.Tensor]:
        cached = [d.get(k) for k in SAMPLING_KEYS]
        if all(isinstance(t, torch.Tensor) for t in cached):
            integral = cached[0]
            if tuple(integral.shape) == tuple(s + 1 for s in shape):
                return dict(zip(SAMPLING_KEYS, cached, strict=True))
        return sampling_index(brain, d.get(self.seg_key), bool(d.get("has_seg", True)))

    def _crop(self, d: dict, start: torch.Tensor, tumour: bool) -> dict:
        p = self.patch_size
        x, y, z = (int(v) for v in start)
        sample = {k: v for k, v in d.items() if k not in self.keys and k in PATCH_KEYS}
        for key in self.key_iterator(d):
            # clone: a view would keep (and ship to the main process) the whole cached volume
            sample[key] = plain_tensor(d[key])[:, x : x + p, y : y + p, z : z + p].clone()
        sample["patch_start"] = start.clone()
        sample["patch_tumour"] = bool(tumour)
        return sample


def train_transforms(
    cfg: PreprocessingConfig,
    samples_per_subject: int,
    tumour_ratio: float = 0.3,
    augment: dict | None = None,
) -> Compose:
    """The random part of training preprocessing: preprocessed subject -> list of patch dicts.

    Args:
        cfg: preprocessing contract (``patch_size``, ``min_brain_fraction``).
        samples_per_subject: patches drawn per subject per call.
        tumour_ratio: share of patches centred on seg > 0 voxels for subjects with a seg.
        augment: ``None`` or ``{}`` for no augmentation, else keys of :data:`DEFAULT_AUGMENT`
            (``flip_prob`` per axis, ``intensity_prob``, ``intensity_scale``,
            ``intensity_shift``); missing keys count as 0 (off).

    Returns:
        A Compose whose call on one preprocessed subject returns a list of
        ``samples_per_subject`` dicts with keys :data:`PATCH_KEYS`. Seed it with
        ``set_random_state(seed)``.
    """
    augment = dict(augment or {})
    unknown = set(augment) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ValueError(
            f"unknown augment keys {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}"
        )
    spatial = ["image", "seg", "brain"]
    steps: list = [
        RandBrainPatchd(
            patch_size=cfg.patch_size,
            num_samples=samples_per_subject,
            min_brain_fraction=cfg.min_brain_fraction,
            tumour_ratio=tumour_ratio,
        )
    ]
    flip = float(augment.get("flip_prob", 0.0))
    if flip > 0:
        steps += [RandFlipd(keys=spatial, prob=flip, spatial_axis=axis) for axis in range(3)]
    prob = float(augment.get("intensity_prob", 0.0))
    scale = float(augment.get("intensity_scale", 0.0))
    shift = float(augment.get("intensity_shift", 0.0))
    if prob > 0 and scale > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=scale, prob=prob, channel_wise=True))
    if prob > 0 and shift > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=shift, prob=prob, channel_wise=True))
        # A shift would lift the background; keep it 0 as the encoder sees it at evaluation.
        steps.append(MaskIntensityd(keys="image", mask_key="brain"))
    if len(steps) > 1:
        steps.append(_PlainPatchd())
    return SafeCompose(steps, log_stats=False)


class _PlainPatchd(MapTransform):
    """Drop MONAI metadata added by augmentation so patches collate as plain tensors."""

    def __init__(self):
        super().__init__(keys=["image", "seg", "brain"])

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = plain_tensor(d[key]).contiguous()
        return d
