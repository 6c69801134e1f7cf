"""Reading NIfTI images safely: every failure becomes an :class:`~aad_med.errors.InputError`
naming the file and the problem. Headers are checked before any voxel is allocated.

Memory stays bounded whatever a header claims. Three limits, all checked from headers before
anything large is read:

- per volume: :data:`MAX_VOXELS` voxels (``max_voxels`` arguments);
- per header: header extensions may declare at most :data:`MAX_EXTENSION_BYTES` bytes in total
  (environment variable ``AAD_MAX_HEADER_EXTENSION_BYTES``). nibabel reads extensions eagerly
  when it opens a file, so :func:`read_header` walks the raw extension records itself first,
  streaming only the first bytes of the (possibly gzipped) file;
- per subject: the voxels decoded across all of a subject's files (four channels and the
  segmentation), and their count after resampling to the target spacing, at most
  :data:`MAX_SUBJECT_VOXELS` (environment variable ``AAD_MAX_SUBJECT_VOXELS``, or the
  ``max_subject_voxels`` arguments); see :func:`check_subject_budget`.

This module owns file reading for the whole package; transforms and validation call it.

Size: every read of a NIfTI file goes through this module, so the header, memory-budget and value
checks cannot be bypassed; splitting it would open a second door.
"""

from __future__ import annotations

import errno
import gzip
import io
import math
import os
import stat
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from aad_med import CHANNELS
from aad_med.data.records import ImageSource, SubjectRecord
from aad_med.errors import ConfigError, InputError

try:  # ISA-L's inflater decodes a BraTS volume ~3x faster than zlib (BENCHMARKS.md).
    # Its streamed reader (igzip.decompress), not a one-call inflate over the whole file: the
    # latter is faster when loading alone (0.13 vs 0.17 s per BraTS-size subject) but measured
    # slower inside aad-compare (issue 17: decode 2.2 vs 1.5 s for 16 subjects, alternating
    # runs; with the output presized from the gzip trailer too).
    from isal.igzip import decompress as _gunzip
    from isal.igzip_lib import IsalError as _InflateError

    INFLATER = "isal"
except ImportError:  # optional: the standard library's zlib gives the same bytes, slower
    _gunzip = gzip.decompress
    _InflateError = zlib.error
    INFLATER = "zlib"

MAX_VOXELS = 512 * 1024 * 1024
"""Refuse images whose header claims more voxels than this (2 GiB as float32) before reading."""

MAX_SUBJECT_VOXELS = 512 * 1024 * 1024
"""Default per-subject budget: voxels decoded across all of one subject's files, and after
resampling to the target spacing (2 GiB as float32; a BraTS subject needs about 45 M)."""

MAX_EXTENSION_BYTES = 64 * 1024 * 1024
"""Default limit on the bytes all header extensions of one file may declare (DICOM or AFNI
extensions of real scans are kilobytes to a few megabytes)."""

SUBJECT_BUDGET_ENV = "AAD_MAX_SUBJECT_VOXELS"
EXTENSION_LIMIT_ENV = "AAD_MAX_HEADER_EXTENSION_BYTES"

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
    matrix shared by all modalities. Read with ``native=True`` (:func:`load_subject`), ``image``
    keeps the files' stored dtype and each channel and the seg keep the stored layout."""

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


def _limit(value: int | None, env: str, default: int) -> int:
    if value is None:
        raw = os.environ.get(env, "").strip()
        if not raw:
            return default
        try:
            value = int(float(raw)) if "e" in raw.lower() else int(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"{env}={raw!r} is not a whole number") from None
        if value < 1:
            raise ConfigError(f"{env}={raw!r} must be at least 1")
        return value
    value = int(value)
    if value < 1:
        raise ConfigError(f"limit must be at least 1, got {value}")
    return value


def subject_voxel_budget(value: int | None = None) -> int:
    """The per-subject voxel budget: ``value``, else ``$AAD_MAX_SUBJECT_VOXELS``, else
    :data:`MAX_SUBJECT_VOXELS`.

    Raises:
        ConfigError: a budget below 1 or an environment value that is not a number.
    """
    return _limit(value, SUBJECT_BUDGET_ENV, MAX_SUBJECT_VOXELS)


def extension_byte_limit(value: int | None = None) -> int:
    """The header-extension limit: ``value``, else ``$AAD_MAX_HEADER_EXTENSION_BYTES``, else
    :data:`MAX_EXTENSION_BYTES`."""
    return _limit(value, EXTENSION_LIMIT_ENV, MAX_EXTENSION_BYTES)


def check_header_extensions(path: str | Path, max_bytes: int | None = None) -> None:
    """Refuse a NIfTI file whose header extensions declare more than ``max_bytes`` in total.

    Reads the raw header fields (streaming a gzip file from its start, never more than the
    declared headers of the extensions plus what is skipped between them, which the limit
    bounds) the way nibabel will: extensions are read when the byte after the header is
    non-zero, from the end of the header up to ``vox_offset``, each ``esize`` bytes long. A file
    that is not a NIfTI-1/2 header at all is left to nibabel's own error.

    Raises:
        InputError: extensions larger than the limit, or an extension size nibabel would turn
            into "read the rest of the file".
    """
    limit = extension_byte_limit(max_bytes)
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            head = f.read(544)
            layout = _nifti_layout(head)
            if layout is None:
                return
            endian, hdr_size, vox_offset = layout
            flag = head[hdr_size : hdr_size + 4]
            if len(flag) < 4 or flag[:1] == b"\x00":
                return
            f.seek(hdr_size + 4)
            remaining = vox_offset - (hdr_size + 4)
            total = 0
            while remaining >= 16:
                ext = f.read(8)
                if len(ext) < 8:
                    return
                esize = struct.unpack(endian + "i", ext[:4])[0]
                if esize < 8:
                    raise InputError(
                        path, f"header extension declares an invalid size {esize} (at least 8)"
                    )
                total += esize
                if total > limit:
                    raise InputError(
                        path,
                        f"header extensions declare at least {total:,} bytes, more than the limit "
                        f"{limit:,} ({EXTENSION_LIMIT_ENV}); refusing to read them",
                    )
                f.seek(esize - 8, os.SEEK_CUR)
                remaining -= esize
    except (OSError, EOFError, zlib.error, struct.error):
        # Unreadable or truncated: nibabel reports it with its own words below.
        return


def _nifti_layout(head: bytes) -> tuple[str, int, int] | None:
    """``(endianness, header size, vox_offset)`` of a raw NIfTI-1/2 header, or ``None``."""
    if len(head) < 352:
        return None
    for endian in ("<", ">"):
        sizeof_hdr = struct.unpack(endian + "i", head[:4])[0]
        if sizeof_hdr == 348:
            offset = struct.unpack(endian + "f", head[108:112])[0]
            if not math.isfinite(offset):
                return None
            return endian, 348, int(offset)
        if sizeof_hdr == 540 and len(head) >= 544:
            return endian, 540, int(struct.unpack(endian + "q", head[168:176])[0])
    return None


def file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a regular file to read, in a few words, or ``None`` when it is.

    Tells apart a missing file, a symbolic link loop, a broken link, a folder, and a device,
    FIFO or socket (which a reader would block on or read forever).
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link resolves to itself)"
        if path.is_symlink():
            return f"broken symbolic link (points to {os.readlink(path)}, which does not exist)"
        if e.errno == errno.ENOENT:
            return "file does not exist"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, expected a NIfTI file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, FIFO or socket)"
    return None


def read_header(path: str | Path, max_voxels: int = MAX_VOXELS) -> nib.Nifti1Image:
    """Open a NIfTI file lazily and check its header; no voxel data is read.

    Header extensions are checked against :func:`extension_byte_limit` before nibabel opens the
    file (it reads them eagerly).

    Raises:
        InputError: missing, unreadable, not NIfTI, non-positive or absurd dimensions, header
            extensions larger than the limit.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise InputError(path, problem)
    if not os.access(path, os.R_OK):
        raise InputError(path, "permission denied (file is not readable)")
    if path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    check_header_extensions(path)
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
    n_bad = 0 if data.dtype.kind in "biu" else int(data.size - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        n_nan = int(np.isnan(data).sum())
        raise InputError(path, f"{n_nan} NaN and {n_bad - n_nan} Inf voxels")
    if not allow_empty and not _any_nonzero(data):
        raise InputError(path, "all voxels are zero (empty volume)")


def _any_nonzero(data: np.ndarray) -> bool:
    """``np.any(data)``, deciding from the middle slice first (a brain's holds voxels)."""
    if data.ndim == 3 and np.any(data[:, :, data.shape[2] // 2]):
        return True
    return bool(np.any(data))


def check_seg_labels(seg: np.ndarray, path: str | Path, keep_layout: bool = False) -> np.ndarray:
    """Return ``seg`` as int16 after checking its labels are integers in :data:`SEG_LABELS`
    (C-ordered, or in ``seg``'s own layout with ``keep_layout``).

    Raises:
        InputError: non-integer labels or labels outside :data:`SEG_LABELS`.
    """
    if seg.dtype.kind in "iu":
        # Integer labels: a range check, and a histogram instead of rounding and sorting only
        # when the range holds a value that is not a label (SEG_LABELS is 0..4, so the range
        # check alone decides; the histogram's intp copy was 0.1 s of a BraTS seg).
        lo, hi = int(seg.min()), int(seg.max())
        in_range = lo >= min(SEG_LABELS) and hi <= max(SEG_LABELS)
        # The range test comes first: a hostile seg can span the whole int64 range.
        if in_range and set(range(lo, hi + 1)) <= set(SEG_LABELS):
            labels = []
        elif in_range:
            counts = np.bincount((seg.ravel(order="K") - lo).astype(np.intp, copy=False))
            labels = np.flatnonzero(counts) + lo
        else:
            labels = np.unique(seg)
    else:
        if np.any(seg != np.round(seg)):
            raise InputError(path, "segmentation has non-integer labels")
        labels = np.unique(seg)
    bad = [int(v) if abs(v) < 2**31 else float(v) for v in labels if v not in SEG_LABELS]
    if bad:
        shown = ", ".join(str(b) for b in bad[:8]) + (", ..." if len(bad) > 8 else "")
        allowed = ", ".join(map(str, SEG_LABELS))
        raise InputError(path, f"segmentation labels {{{shown}}} outside {{{allowed}}}")
    out = np.empty_like(seg, dtype=np.int16, order="K" if keep_layout else "C")
    copy_volume(out, seg)
    return out


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


def _stored_array(img: nib.Nifti1Image, path: str | Path) -> np.ndarray:
    """The voxels of ``img`` as nibabel would read them, from one read of the whole file and,
    when gzipped, one inflate (:data:`INFLATER`) instead of nibabel's streamed ``GzipFile``.

    Without scaling (slope 1, intercept 0) the result is a zero-copy view in the stored dtype
    and order (NIfTI stores x fastest: a Fortran-ordered array); with scaling, nibabel's own
    array proxy applies it over the in-memory bytes and returns float32.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = _gunzip(raw)
    proxy = img.dataobj
    shape, dtype, offset = tuple(proxy.shape), np.dtype(proxy.dtype), int(proxy.offset)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope == 1.0 and inter == 0.0 and dtype.kind in "iuf":
        count = math.prod(shape)
        if offset + count * dtype.itemsize > len(raw):
            raise EOFError(
                f"file holds {len(raw) - offset} data bytes, header needs {count * dtype.itemsize}"
            )
        flat = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
        return flat.reshape(shape, order=proxy.order)
    mem = type(proxy)(
        io.BytesIO(raw), (shape, dtype, offset, slope, inter), mmap=False, order=proxy.order
    )
    return np.asarray(mem, dtype=np.float32)


def read_stored(img: nib.Nifti1Image, path: str | Path, volume: int | None) -> np.ndarray:
    """Voxels in the stored dtype (float32 when the header scales them), possibly a read-only,
    Fortran-ordered view: ``(X, Y, Z)`` for one volume, ``(X, Y, Z, T)`` for ``volume=-1``.
    :func:`copy_volume` turns them into a C-ordered float32 array.

    Raises:
        InputError: unreadable, truncated or corrupt file (named).
    """
    shape = img.shape
    with _reading_voxels(path):
        data = _stored_array(img, path)
        if volume is None:
            return data.reshape(shape[:3], order="A")
        if volume == -1:
            return data
        return data[..., volume]


@contextmanager
def _reading_voxels(path: str | Path) -> Iterator[None]:
    """Turn what reading a file's voxels can raise into one :class:`InputError` naming it."""
    try:
        with np.errstate(all="ignore"):
            yield
    except PermissionError:
        raise InputError(path, "permission denied (file is not readable)") from None
    except (EOFError, zlib.error, gzip.BadGzipFile, _InflateError) as e:
        raise InputError(path, f"truncated or corrupt file ({_short(e)})") from None
    except (OSError, ValueError, TypeError, MemoryError, OverflowError) as e:
        raise InputError(
            path, f"could not read voxel data, file truncated? ({_short(e)})"
        ) from None


MID_SLICE_MEMO_BYTES = 64 * 1024**2
"""Bound of the middle slices kept from whole-volume reads (:class:`MidSliceMemo`): about 140
BraTS subjects' four int16 slices."""


class MidSliceMemo:
    """The middle slices (:func:`read_mid_slice`) of volumes :func:`load_subject` decoded whole
    (``native=True``: the embedding's data path), so a report thumbnail of a subject the
    embedding read costs no second read of its files.

    Keyed by the file's identity (device, inode, size, modification and status-change times,
    as :class:`aad_med.io_utils.DigestMemo`) and the volume index: a file replaced or rewritten
    is read again, also when its modification time was put back (``cp`` then ``touch -r``). Slices are kept in the stored dtype
    (unscaled files only, so the float32 values are exactly those read from the file), the
    least recently used dropped beyond ``max_bytes``. Thread-safe (the prefetching thread).
    """

    def __init__(self, max_bytes: int = MID_SLICE_MEMO_BYTES):
        self.max_bytes = int(max_bytes)
        self._slices: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(source: ImageSource) -> tuple | None:
        try:
            st = os.stat(source.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, source.volume)

    def put(self, source: ImageSource, img: nib.Nifti1Image, volume: np.ndarray) -> None:
        """Keep the middle slice of ``volume`` (``(X, Y, Z)`` as read from ``img``'s file)."""
        proxy = img.dataobj
        if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0 or volume.ndim != 3:
            self._drop(source)  # nothing kept may outlive what this read saw
            return
        self._keep(source, np.array(volume[:, :, volume.shape[2] // 2], order="C"))

    def _drop(self, source: ImageSource) -> None:
        key = self._key(source)
        with self._lock:
            old = None if key is None else self._slices.pop(key, None)
            self._bytes -= 0 if old is None else old.nbytes

    def _keep(self, source: ImageSource, mid: np.ndarray) -> None:
        key = self._key(source)
        if key is None:
            return
        with self._lock:
            old = self._slices.pop(key, None)
            self._bytes -= 0 if old is None else old.nbytes
            self._slices[key] = mid
            self._bytes += mid.nbytes
            while self._bytes > self.max_bytes and self._slices:
                self._bytes -= self._slices.popitem(last=False)[1].nbytes

    def get(self, source: ImageSource) -> np.ndarray | None:
        """The kept slice as float32, or ``None``."""
        key = self._key(source)
        with self._lock:
            mid = None if key is None else self._slices.get(key)
            if mid is not None:
                self._slices.move_to_end(key)
        return None if mid is None else mid.astype(np.float32)

    def subject_slices(self, record: SubjectRecord) -> np.ndarray | None:
        """The kept middle slices of ``record``'s four channels as one ``(4, X, Y)`` float32
        array (to store beside a cached subject), or ``None`` when one is not kept."""
        slices = [self.get(record.images[ch]) for ch in CHANNELS]
        if any(s is None for s in slices) or len({s.shape for s in slices}) != 1:
            return None
        return np.stack(slices)

    def restore(self, record: SubjectRecord, slices: np.ndarray) -> None:
        """Keep ``slices`` (:meth:`subject_slices`, read back from a cache whose key holds the
        files' identity) as ``record``'s channels' middle slices."""
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim != 3 or slices.shape[0] != len(CHANNELS):
            return
        if np.array_equal(slices, np.rint(slices)) and np.abs(slices).max(initial=0) < 2**15:
            # Integer-valued (an int16 file's): kept as int16, half the bytes, the same values.
            slices = slices.astype(np.int16)
        for ch, mid in zip(CHANNELS, slices, strict=True):
            self._keep(record.images[ch], np.array(mid, order="C"))

    def clear(self) -> None:
        with self._lock:
            self._slices.clear()
            self._bytes = 0


MID_SLICES = MidSliceMemo()
"""The process's :class:`MidSliceMemo`, filled by ``load_subject(native=True)``."""


def read_mid_slice(source: ImageSource, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """The middle slice along the third stored axis, ``(X, Y)`` float32, as the whole volume's
    ``[:, :, Z // 2]`` would give it: from :data:`MID_SLICES` when this process decoded the
    volume whole, else nibabel's array proxy reads only the bytes of that slice (a ``.nii.gz``
    is inflated up to it, not past it: 0.1 s at BraTS size instead of 0.28 s for the volume).

    Raises:
        InputError: unreadable, truncated or corrupt file (named).
    """
    kept = MID_SLICES.get(source)
    if kept is not None:
        return kept
    img = read_header(source.path, max_voxels)
    index: tuple = (slice(None), slice(None), img.shape[2] // 2)
    if source.volume is not None:
        index += (source.volume,)
    with _reading_voxels(source.path):
        return np.asarray(img.dataobj[index], dtype=np.float32)


_TILE = 32


def copy_volume(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` (with dtype cast) in 32x32 tiles of the first two axes: a Fortran-
    ordered NIfTI volume copied into a C-ordered array is a transpose, and tiles keep both sides
    in cache (2-3x faster than one ``copyto`` at BraTS size). Values a narrower ``dst`` cannot
    hold become Inf silently: callers check the result (:func:`check_values`)."""
    with np.errstate(over="ignore"):
        _copy_tiles(dst, src)


def _copy_tiles(dst: np.ndarray, src: np.ndarray) -> None:
    if src.ndim != 3 or _fastest_axis(src) == _fastest_axis(dst):
        np.copyto(dst, src, casting="unsafe")
        return
    for i in range(0, src.shape[0], _TILE):
        for j in range(0, src.shape[1], _TILE):
            np.copyto(
                dst[i : i + _TILE, j : j + _TILE],
                src[i : i + _TILE, j : j + _TILE],
                casting="unsafe",
            )


def _fastest_axis(a: np.ndarray) -> int:
    """The axis along which ``a``'s elements are adjacent in memory (the smallest stride)."""
    return int(
        np.argmin([abs(st) if n > 1 else np.inf for st, n in zip(a.strides, a.shape, strict=True)])
    )


NATIVE_DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.float32))
"""Stored dtypes :func:`load_subject` keeps with ``native=True``: every value is exactly a
float32, so computing on them equals computing on the float32 cast."""


def stored_dtype(img: nib.Nifti1Image) -> np.dtype:
    """The dtype :func:`read_stored` returns for ``img`` (native byte order): the stored one, or
    float32 when the header scales the voxels."""
    proxy = img.dataobj
    dtype = np.dtype(proxy.dtype)
    if float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0 and dtype.kind in "iuf":
        return dtype.newbyteorder("=")
    return np.dtype(np.float32)


def _channel_stack(n: int, like: np.ndarray, dtype: np.dtype, native: bool) -> np.ndarray:
    """An empty ``(n, *like.shape)`` array; with ``native`` each channel has ``like``'s layout
    (a Fortran-ordered NIfTI volume is then copied without a transpose)."""
    if not native or _fastest_axis(like) == like.ndim - 1:
        return np.empty((n, *like.shape), dtype=dtype)
    return np.empty((n, *like.shape[::-1]), dtype=dtype).transpose(0, *range(like.ndim, 0, -1))


def read_voxels(img: nib.Nifti1Image, path: str | Path, volume: int | None) -> np.ndarray:
    """Voxels as float32: ``(X, Y, Z)`` for one volume, ``(X, Y, Z, T)`` for ``volume=-1``."""
    data = read_stored(img, path, volume)
    if data.ndim != 3:
        return np.asarray(data, dtype=np.float32)
    out = np.empty(data.shape, dtype=np.float32)
    copy_volume(out, data)
    return out


def header_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm (column norms of the affine's 3x3 part)."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(s) for s in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))


def check_subject_budget(
    subject_id: str,
    headers: Sequence[tuple[ImageSource, nib.Nifti1Image, np.ndarray]],
    max_subject_voxels: int | None = None,
    target_spacing: Sequence[float] | None = None,
    patch_size: int | None = None,
) -> None:
    """Refuse a subject whose files would decode, or resample, to more than the budget.

    Counts what loading allocates: every 3D source's voxels, a 4D file's voxels once, and, when
    ``target_spacing`` is given, each source's voxel count after resampling to it (each axis's
    extent over the target spacing, at least ``patch_size`` since volumes are padded to it).
    Only headers are used.

    Args:
        subject_id: named in the message.
        headers: ``(source, header, affine)`` of each channel (and the seg), as read by
            :func:`read_header` and :func:`check_affine`.
        max_subject_voxels: the budget; ``None`` uses :func:`subject_voxel_budget`.
        target_spacing: the preprocessing spacing in mm, or ``None`` (no resampling).
        patch_size: edge every axis is padded to after resampling, or ``None``.

    Raises:
        InputError: naming the subject's largest file, the count and the budget.
        ConfigError: a non-positive budget or target spacing.
    """
    budget = subject_voxel_budget(max_subject_voxels)
    if not headers:
        return
    decoded = 0
    seen_4d: set[Path] = set()
    for src, img, _ in headers:
        shape = tuple(int(v) for v in img.shape)
        if src.volume is not None:
            if src.path in seen_4d:
                continue
            seen_4d.add(src.path)
        decoded += math.prod(shape) if src.volume is not None else math.prod(shape[:3])
    largest_src, largest_img, _ = max(headers, key=lambda h: math.prod(h[1].shape[:3]))
    where = f"{largest_src.path}"
    hint = f"; refusing to read (raise the limit with {SUBJECT_BUDGET_ENV})"
    if decoded > budget:
        raise InputError(
            where,
            f"subject {subject_id} would decode to {decoded:,} voxels across its "
            f"{len(headers)} images (this one {tuple(largest_img.shape)}), more than the "
            f"per-subject budget of {budget:,}{hint}",
        )
    if target_spacing is None:
        return
    target = [float(t) for t in target_spacing]
    if len(target) != 3 or not all(math.isfinite(t) and t > 0 for t in target):
        raise ConfigError(f"target spacing must be 3 positive numbers, got {target_spacing}")
    pad = max(1, int(patch_size or 1))
    resampled = 0.0
    for _, img, affine in headers:
        # Reorientation may permute axes; with an anisotropic target this is an estimate.
        sizes = [
            max(pad, n * s / t)
            for n, s, t in zip(img.shape[:3], header_spacing(affine), target, strict=True)
        ]
        resampled += math.prod(sizes)
    if resampled > budget:
        spacing = "x".join(f"{v:.3g}" for v in header_spacing(headers[0][2]))
        raise InputError(
            where,
            f"subject {subject_id} resampled from {spacing} mm to "
            f"{'x'.join(f'{t:g}' for t in target)} mm spacing would hold {resampled:,.0f} voxels "
            f"across its {len(headers)} images, more than the per-subject budget of {budget:,}"
            f"{hint}",
        )


def load_subject(
    record: SubjectRecord,
    max_voxels: int = MAX_VOXELS,
    affine_tolerance: float = AFFINE_TOLERANCE,
    load_seg: bool = True,
    max_subject_voxels: int | None = None,
    target_spacing: Sequence[float] | None = None,
    patch_size: int | None = None,
    native: bool = False,
) -> LoadedSubject:
    """Read all modalities of a subject, checking that they share one grid.

    Every header is read and checked first, then the subject's decoded (and, with
    ``target_spacing``, resampled) size against the per-subject budget
    (:func:`check_subject_budget`), before any voxel is read. A 4D file (Decathlon layout) is
    decompressed once, not once per channel.

    Args:
        record: the subject's files.
        max_voxels: per-volume header limit.
        affine_tolerance: largest affine difference between the subject's files (mm).
        load_seg: also read the segmentation when there is one.
        max_subject_voxels: per-subject budget; ``None`` uses :func:`subject_voxel_budget`.
        target_spacing: spacing the caller will resample to (counted in the budget).
        patch_size: edge the caller pads every axis to after resampling (counted too).
        native: keep the stored dtype when every channel shares one of :data:`NATIVE_DTYPES`
            (else float32), and the stored layout (x fastest) of each channel and the seg: no
            cast and no transpose of the whole volumes (a BraTS subject's int16 channels are
            copied 2-3x faster); the values are those of the float32 image. The channels'
            middle slices are kept in :data:`MID_SLICES` for report thumbnails.

    Raises:
        InputError: the first problem found (file named). Use
            :func:`aad_med.data.validation.validate_cohort` to collect all problems.
    """
    sources = [(ch, record.images[ch]) for ch in CHANNELS]
    if load_seg and record.seg is not None:
        sources.append(("seg", record.seg))
    headers: dict[str, tuple[ImageSource, nib.Nifti1Image, np.ndarray]] = {}
    for name, src in sources:
        img = read_header(src.path, max_voxels)
        check_dimensions(img, src)
        headers[name] = (src, img, check_affine(img, src.path))
    check_subject_budget(
        record.subject_id, list(headers.values()), max_subject_voxels, target_spacing, patch_size
    )
    dtype = np.dtype(np.float32)
    if native:
        stored = {stored_dtype(headers[ch][1]) for ch in CHANNELS}
        if len(stored) == 1 and next(iter(stored)) in NATIVE_DTYPES:
            dtype = stored.pop()
    # Filled channel by channel: peak memory is the subject plus one volume, not twice it.
    image: np.ndarray | None = None
    ref_path, ref_shape, ref_affine = None, None, None
    four_d: dict[Path, np.ndarray] = {}
    for c, ch in enumerate(CHANNELS):
        src, img, affine = headers[ch]
        if src.volume is None:
            data = read_stored(img, src.path, None)
            check_values(data, src.path)
        else:
            if src.path not in four_d:
                four_d[src.path] = read_stored(img, src.path, -1)
            data = four_d[src.path][..., src.volume]
            check_values(data, f"{src.path} (volume {src.volume}, {ch})")
        if native:
            MID_SLICES.put(src, img, data)
        if ref_shape is None:
            ref_path, ref_shape, ref_affine = src.path, data.shape, affine
        else:
            _check_same_grid(
                src.path, data.shape, affine, ref_path, ref_shape, ref_affine, affine_tolerance
            )
        if image is None:
            image = _channel_stack(len(CHANNELS), data, dtype, native)
        copy_volume(image[c], data)
        if data.dtype.kind == "f" and data.dtype.itemsize > 4:
            # float64 voxels beyond float32's range become Inf, and tiny ones 0, in the cast.
            check_values(image[c], src.path)
        del data
    four_d.clear()
    seg = None
    if "seg" in headers:
        src, img, seg_affine = headers["seg"]
        seg_data = read_stored(img, src.path, src.volume)
        check_values(seg_data, src.path, allow_empty=True)
        _check_same_grid(
            src.path, seg_data.shape, seg_affine, ref_path, ref_shape, ref_affine, affine_tolerance
        )
        seg = check_seg_labels(seg_data, src.path, keep_layout=native)
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
