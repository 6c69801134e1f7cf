"""Reading NIfTI images safely: every failure becomes an :class:`~aad_med.errors.InputError`
naming the file and the problem. Headers are checked before any voxel is allocated.

This module owns file reading for the whole package; transforms and validation call it.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from aad_med import CHANNELS
from aad_med.data.records import ImageSource, SubjectRecord
from aad_med.errors import InputError

MAX_VOXELS = 512 * 1024 * 1024
"""Refuse images whose header claims more voxels than this (2 GiB as float32) before reading."""

AFFINE_TOLERANCE = 1e-3
"""Largest absolute difference allowed between the affines of one subject's modalities (mm)."""

NIFTI_SUFFIXES = (".nii", ".nii.gz")

SEG_LABELS: tuple[int, ...] = (0, 1, 2, 3, 4)
"""Segmentation labels accepted: BraTS (1 necrosis, 2 oedema, 4 enhancing; 3 in BraTS 2023)
and the Decathlon's (1 oedema, 2 non-enhancing, 3 enhancing)."""

_HEADER_ERRORS = (
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
    nib.wrapstruct.WrapStructError,
    gzip.BadGzipFile,
    zlib.error,
    EOFError,
)


@dataclass
class LoadedSubject:
    """One subject in memory: ``image`` is channel-first ``(4, X, Y, Z)`` float32 in canonical
    channel order, ``seg`` is ``(X, Y, Z)`` int16 or ``None``, ``affine`` is the 4x4 voxel-to-world
    matrix shared by all modalities."""

    subject_id: str
    image: np.ndarray
    seg: np.ndarray | None
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def is_nifti_path(path: str | Path) -> bool:
    """True when the file name ends like a NIfTI file (``.nii`` or ``.nii.gz``)."""
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_header(path: str | Path, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """Open a NIfTI file lazily and check its header; no voxel data is read.

    Raises:
        InputError: missing, unreadable, not NIfTI, non-positive or absurd dimensions.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder, expected a NIfTI file")
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied (file is not readable)")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    try:
        # Garbage header fields make nibabel's affine arithmetic warn; the checks below decide.
        with np.errstate(all="ignore"):
            img = nib.load(str(path))
    except PermissionError:
        raise InputError(path, "permission denied (file is not readable)") from None
    except _HEADER_ERRORS as e:
        raise InputError(path, f"not a readable NIfTI file ({_short(e)})") from None
    except (ValueError, OSError, TypeError, OverflowError, MemoryError, IndexError) as e:
        raise InputError(path, f"invalid NIfTI header ({_short(e)})") from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"not a NIfTI image (nibabel read it as {type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if not shape:
        raise InputError(path, "header has no dimensions")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputError(path, f"unsupported voxel data type {dtype} (expected integers or floats)")
    if any(s <= 0 for s in shape):
        raise InputError(path, f"header has non-positive dimensions {shape}")
    n_voxels = int(np.prod(shape, dtype=np.float64))
    if n_voxels > max_voxels:
        raise InputError(
            path,
            f"header claims {shape} = {n_voxels:,} voxels, more than the limit {max_voxels:,}; "
            "refusing to allocate",
        )
    return img


def load_volume(
    source: ImageSource, max_voxels: int = MAX_VOXELS, allow_empty: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Read one 3D volume (or one volume of a 4D file) as float32 with its affine.

    Args:
        source: the file and, for 4D files, the volume index.
        max_voxels: header size limit, checked before reading.
        allow_empty: accept an all-zero volume (segmentations may be empty).

    Returns:
        ``(data, affine)`` with ``data`` of shape ``(X, Y, Z)``.

    Raises:
        InputError: any problem with the file, named.
    """
    img = read_header(source.path, max_voxels)
    check_dimensions(img, source)
    affine = check_affine(img, source.path)
    data = read_voxels(img, source.path, source.volume)
    check_values(data, source.path, allow_empty=allow_empty)
    return data, affine


def check_dimensions(img: nib.Nifti1Image, source: ImageSource) -> tuple[int, int, int]:
    """Check that a header describes a 3D volume (or a 4D file holding ``source.volume``).

    Returns:
        The spatial shape ``(X, Y, Z)``.

    Raises:
        InputError: wrong dimensionality or missing volume.
    """
    path, shape = source.path, tuple(int(s) for s in img.shape)
    if source.volume is None:
        # Trailing singleton dimensions (X, Y, Z, 1) are common and harmless.
        core = tuple(shape[:3]) + tuple(s for s in shape[3:] if s != 1)
        if len(shape) < 3 or len(core) != 3:
            raise InputError(path, f"expected a 3D image, got {len(shape)}D with shape {shape}")
    else:
        if len(shape) != 4:
            raise InputError(path, f"expected a 4D image, got {len(shape)}D with shape {shape}")
        if not 0 <= source.volume < shape[3]:
            raise InputError(path, f"has {shape[3]} volumes, volume {source.volume} requested")
    return shape[0], shape[1], shape[2]


def check_values(data: np.ndarray, path: str | Path, allow_empty: bool = False) -> None:
    """Refuse NaN/Inf voxels and (unless ``allow_empty``) an all-zero volume.

    Raises:
        InputError: naming the file and the count of bad voxels.
    """
    n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        n_nan = int(np.isnan(data).sum())
        raise InputError(path, f"{n_nan} NaN and {n_bad - n_nan} Inf voxels")
    if not allow_empty and not np.any(data):
        raise InputError(path, "all voxels are zero (empty volume)")


def check_seg_labels(seg: np.ndarray, path: str | Path) -> np.ndarray:
    """Return ``seg`` as int16 after checking its labels are integers in :data:`SEG_LABELS`.

    Raises:
        InputError: non-integer labels or labels outside :data:`SEG_LABELS`.
    """
    if np.any(seg != np.round(seg)):
        raise InputError(path, "segmentation has non-integer labels")
    labels = np.unique(seg)
    bad = [int(v) if abs(v) < 2**31 else float(v) for v in labels if v not in SEG_LABELS]
    if bad:
        shown = ", ".join(str(b) for b in bad[:8]) + (", ..." if len(bad) > 8 else "")
        allowed = ", ".join(map(str, SEG_LABELS))
        raise InputError(path, f"segmentation labels {{{shown}}} outside {{{allowed}}}")
    return seg.astype(np.int16)


def check_affine(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """The header affine as float64, refused when singular or not finite."""
    try:
        with np.errstate(all="ignore"):
            affine = np.asarray(img.affine, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(path, f"header affine unreadable ({_short(e)})") from None
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "header affine is singular or not finite")
    return affine


def read_voxels(img: nib.Nifti1Image, path: str | Path, volume: int | None) -> np.ndarray:
    """Voxels as float32: ``(X, Y, Z)`` for one volume, ``(X, Y, Z, T)`` for ``volume=-1``."""
    shape = img.shape
    try:
        with np.errstate(all="ignore"):
            if volume is None:
                return np.asarray(img.dataobj, dtype=np.float32).reshape(shape[:3])
            if volume == -1:
                return np.asarray(img.dataobj, dtype=np.float32)
            return np.asarray(img.dataobj[..., volume], dtype=np.float32)
    except PermissionError:
        raise InputError(path, "permission denied (file is not readable)") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(path, f"truncated or corrupt file ({_short(e)})") from None
    except (OSError, ValueError, TypeError, MemoryError, OverflowError) as e:
        raise InputError(
            path, f"could not read voxel data, file truncated? ({_short(e)})"
        ) from None


def load_subject(
    record: SubjectRecord,
    max_voxels: int = MAX_VOXELS,
    affine_tolerance: float = AFFINE_TOLERANCE,
    load_seg: bool = True,
) -> LoadedSubject:
    """Read all modalities of a subject, checking that they share one grid.

    A 4D file (Decathlon layout) is decompressed once, not once per channel.

    Raises:
        InputError: the first problem found (file named). Use
            :func:`aad_med.data.validation.validate_cohort` to collect all problems.
    """
    # Filled channel by channel: peak memory is the subject plus one volume, not twice it.
    image: np.ndarray | None = None
    ref_path, ref_shape, ref_affine = None, None, None
    four_d: dict[Path, np.ndarray] = {}
    for c, ch in enumerate(CHANNELS):
        src = record.images[ch]
        if src.volume is None:
            data, affine = load_volume(src, max_voxels)
        else:
            img = read_header(src.path, max_voxels)
            check_dimensions(img, src)
            affine = check_affine(img, src.path)
            if src.path not in four_d:
                four_d[src.path] = read_voxels(img, src.path, -1)
            data = four_d[src.path][..., src.volume]
            check_values(data, f"{src.path} (volume {src.volume}, {ch})")
        if ref_shape is None:
            ref_path, ref_shape, ref_affine = src.path, data.shape, affine
        else:
            _check_same_grid(
                src.path, data.shape, affine, ref_path, ref_shape, ref_affine, affine_tolerance
            )
        if image is None:
            image = np.empty((len(CHANNELS), *data.shape), dtype=np.float32)
        image[c] = data
        del data
    four_d.clear()
    seg = None
    if load_seg and record.seg is not None:
        seg_data, seg_affine = load_volume(record.seg, max_voxels, allow_empty=True)
        _check_same_grid(
            record.seg.path,
            seg_data.shape,
            seg_affine,
            ref_path,
            ref_shape,
            ref_affine,
            affine_tolerance,
        )
        seg = check_seg_labels(seg_data, record.seg.path)
    return LoadedSubject(record.subject_id, image, seg, ref_affine)


def _check_same_grid(path, shape, affine, ref_path, ref_shape, ref_affine, tol) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise InputError(
            path, f"shape {tuple(shape)} differs from {Path(ref_path).name} {tuple(ref_shape)}"
        )
    diff = float(np.max(np.abs(affine - ref_affine)))
    if diff > tol:
        raise InputError(
            path, f"affine differs from {Path(ref_path).name} by {diff:.3g} (tolerance {tol:g})"
        )


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]
