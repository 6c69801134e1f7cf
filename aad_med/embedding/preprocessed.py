"""Stage 4, embedding: subjects as the encoder sees them, each preprocessed once and kept on disk.

Preprocessing is deterministic and independent of the checkpoint, so a second comparison of the
same cohorts with another encoder or feature set need not decode a single volume again.
:class:`PreprocessedSubjects` turns subject records into embedding items (the keys of
:data:`EMBED_KEYS`) and times each phase; :class:`PreprocessedCache` keeps its results:

- key: :func:`aad_med.io_utils.cache_key` of the subject's record, its files (path, size,
  modification time and content digest: :func:`aad_med.io_utils.file_stats`), the
  preprocessing settings, :data:`PREPROCESSED_VERSION` and
  :data:`aad_med.data.quality.QUALITY_VERSION`; change any of them and the entry is simply not
  found;
- format (``KEY.npys``, :data:`ENTRY_SUFFIX`): a stream of uncompressed ``.npy`` records, each
  read with ``np.load(f, allow_pickle=False)`` straight into the array the encoder consumes
  (float32 image: no cast, no copy beyond the read); the first record is a JSON table naming every array with
  its dtype, shape and CRC-32, checked on every read (igzip's CRC-32 from ``isal``, about
  2.5 ms for a 51 MB BraTS entry, 5x faster than ``zlib.crc32`` that ``.npz`` used). Written
  atomically (about 51 MB for a BraTS subject cropped to its brain). Entries also hold the
  subject's evaluation-grid positions (:func:`eval_positions`), a deterministic function of
  the brain mask and the preprocessing settings in the key, so a second run does not rebuild
  the grid;
- size bound: the least recently used entries are deleted once the folder holds more than
  ``max_bytes`` (a hit refreshes an entry's modification time); entries of the first format
  (``.npz``, never read again: their keys had another version) count and age out too;
- an unreadable entry (truncated, flipped bytes, another layout) is reported, deleted and
  recomputed: a cache entry never fails a run.

Modes (``aad-compare cache=off|read|write``): ``off`` neither reads nor writes, ``read`` uses
existing entries and never writes (a shared or read-only cache), ``write`` reads and adds.

Embedding items carry no segmentation. The seg file is decoded (and its labels checked) only
when asked for: ``check_seg=True`` (validation's voxel checks folded into this one decode of every
file, ``seg_checked`` in the item and the entry) or ``quality=True`` (the image-quality metrics
leave tumour voxels out of the tissue classes; they are computed here from the volumes decoded
once for the embedding, so the per-subject step of ``aad-compare`` reads no volume again and a
second comparison reads them from this cache). No statistics and no encoder here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from aad_med.data.intensity import FINGERPRINT_PERCENTILES, fingerprint_row
from aad_med.data.io import MID_SLICES
from aad_med.data.patches import eval_patch_positions
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.quality import QUALITY_COLUMNS, QUALITY_VERSION, quality_row
from aad_med.data.records import SubjectRecord
from aad_med.data.transforms import PREPROCESSED_KEYS, FusedPreprocessd, LoadSubjectd
from aad_med.errors import ConfigError
from aad_med.io_utils import DigestMemo, atomic_path, cache_key, file_stats

try:  # igzip's CRC-32 (the same checksum as zlib's, 5x faster); isal is x86-64/arm64 only
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - other platforms
    _crc32 = zlib.crc32

log = logging.getLogger(__name__)

PREPROCESSED_VERSION = 2
"""Bumped whenever preprocessing changes what it produces or the entry format changes
(invalidates old entries). 2: the ``.npys`` format with the evaluation-grid positions."""

ENTRY_SUFFIX = ".npys"
"""File suffix of a preprocessed cache entry (a stream of ``.npy`` records)."""

ENTRY_FORMAT = 2
"""Format number in an entry's JSON table (read back and checked)."""

_LEGACY_SUFFIXES = (".npz",)
"""Entries of earlier formats: never read, but counted by the size bound and evicted first."""

CACHE_MODES = ("off", "read", "write")

DEFAULT_MAX_BYTES = 20 * 1024**3
"""Default size bound of the preprocessed cache (about 330 BraTS subjects)."""

EMBED_KEYS = (*(k for k in PREPROCESSED_KEYS if k != "seg"), "fingerprint")
"""Keys of an embedding item: those of :data:`aad_med.data.transforms.PREPROCESSED_KEYS` but
``seg``, plus ``fingerprint`` (``(4 * 7,)`` float64, :func:`aad_med.data.intensity.fingerprint_row`
of the raw image). Items also carry ``timings``: seconds per phase for this subject, and, when
asked for, ``quality``: the subject's image-quality row
(:func:`aad_med.data.quality.quality_row`, :data:`~aad_med.data.quality.QUALITY_COLUMNS`), and
``positions``/``grid``: the evaluation grid (:func:`eval_positions`)."""

_ARRAYS = {
    "image": np.float32,
    "brain": np.uint8,
    "affine": np.float64,
    "crop_start": np.int64,
    "ras_shape": np.int64,
    "spacing": np.float64,
    "fingerprint": np.float64,
    "positions": np.int64,
    "grid": np.float64,
}
"""Arrays every entry holds, with their dtypes (besides ``subject_id``, ``has_seg``,
``seg_checked``, the optional ``quality`` and the optional ``mid_slices``: the channels'
``(4, X, Y)`` float32 middle slices for thumbnails)."""


def cache_mode(value: Any) -> str:
    """``off``, ``read`` or ``write`` from a config value (``true``/``false`` mean write/off).

    Raises:
        ConfigError: any other value.
    """
    if isinstance(value, bool) or value is None:
        return "write" if value else "off"
    mode = str(value).strip().lower()
    mode = {"true": "write", "false": "off", "none": "off", "readwrite": "write"}.get(mode, mode)
    if mode not in CACHE_MODES:
        raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, got {value!r}")
    return mode


def default_preprocessed_dir() -> Path:
    """``$AAD_MED_CACHE/preprocessed`` or ``~/.cache/aad-med/preprocessed``."""
    root = os.environ.get("AAD_MED_CACHE") or Path.home() / ".cache" / "aad-med"
    return Path(root) / "preprocessed"


def subject_key(
    record: SubjectRecord, preprocessing: PreprocessingConfig, memo: DigestMemo | None = None
) -> str:
    """The cache key of one subject's preprocessed item (``memo``: the files' digests kept
    across runs, :class:`aad_med.io_utils.DigestMemo`)."""
    payload = {
        "v": PREPROCESSED_VERSION,
        "record": record.as_dict(),
        "files": file_stats(record.files, memo),
        "preprocessing": preprocessing.to_dict(),
        "fingerprint_percentiles": list(FINGERPRINT_PERCENTILES),
        "quality": QUALITY_VERSION,  # entries hold the quality row when asked for
    }
    return cache_key(payload)


class PreprocessedCache:
    """A size-bounded folder of preprocessed subjects (see the module docstring).

    Args:
        root: the folder (created on first write).
        mode: ``"read"`` or ``"write"``.
        max_bytes: size bound; the least recently used entries go first.
    """

    def __init__(self, root: str | Path, mode: str = "write", max_bytes: int = DEFAULT_MAX_BYTES):
        if mode not in ("read", "write"):
            raise ConfigError(f"a preprocessed cache is opened to read or write, not {mode!r}")
        if max_bytes <= 0:
            raise ConfigError(f"preprocessed cache size bound must be positive, got {max_bytes}")
        self.root = Path(root)
        self.mode = mode
        self.max_bytes = int(max_bytes)

    def path(self, key: str) -> Path:
        return self.root / f"{key}{ENTRY_SUFFIX}"

    def get(self, key: str) -> dict | None:
        """The item stored under ``key``, or ``None`` (missing, or unreadable: then deleted)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                item = _from_arrays(read_entry(f))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - any damage to an entry means: recompute it
            log.warning("removing unreadable preprocessed cache entry %s (%s)", path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently *used* goes first
        return item

    def put(self, key: str, item: Mapping[str, Any]) -> None:
        """Store ``item`` (read mode: nothing), then evict down to the size bound."""
        if self.mode != "write":
            return
        path = self.path(key)
        arrays = _to_arrays(item)
        try:
            # Atomic but not fsync'd: an entry lost or damaged by a crash is recomputed
            # (get), so durability is not worth a folder fsync per subject (write_cache_entry).
            with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
                write_entry(f, arrays)
        except OSError as e:
            # A full or read-only disk costs speed, never the comparison.
            log.warning("could not write preprocessed cache entry %s (%s)", path, e)
            return
        self.evict(keep=path)

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used entries until the folder fits ``max_bytes``.

        Returns:
            The number of entries deleted.
        """
        entries = []
        for p in self.root.iterdir() if self.root.is_dir() else ():
            if p.suffix not in (ENTRY_SUFFIX, *_LEGACY_SUFFIXES) or p.name.startswith("."):
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            # Entries of an earlier format are never read again: they go first.
            entries.append((p.suffix == ENTRY_SUFFIX, st.st_mtime_ns, st.st_size, p))
        total = sum(e[2] for e in entries)
        removed = 0
        for _, _, size, p in sorted(entries, key=lambda e: e[:2]):
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed


def _contiguous(a: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it makes 0-d arrays (subject_id, flags) 1-d.
    return a if a.flags.c_contiguous else a.copy(order="C")


def _crc(a: np.ndarray) -> int:
    return _crc32(_contiguous(a).reshape(-1).view(np.uint8))


def write_entry(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as one entry: a JSON table (format, then name, dtype, shape and CRC-32
    of every array, as a uint8 ``.npy`` record), then each array as an ``.npy`` record."""
    arrays = {k: _contiguous(np.asarray(a)) for k, a in arrays.items()}
    table = {
        "format": ENTRY_FORMAT,
        "arrays": [[k, a.dtype.str, list(a.shape), _crc(a)] for k, a in arrays.items()],
    }
    head = np.frombuffer(json.dumps(table).encode("utf-8"), dtype=np.uint8)
    np.lib.format.write_array(f, head, allow_pickle=False)
    for a in arrays.values():
        np.lib.format.write_array(f, a, allow_pickle=False)


def read_entry(f: BinaryIO) -> dict[str, np.ndarray]:
    """The arrays of an entry written by :func:`write_entry`, each checked against the table
    (dtype, shape, CRC-32) and the file against its end.

    Raises:
        ValueError: anything that is not a whole, intact entry of this format.
    """
    head = np.load(f, allow_pickle=False)
    if head.dtype != np.uint8 or head.ndim != 1:
        raise ValueError("no entry table")
    table = json.loads(head.tobytes().decode("utf-8"))
    if not isinstance(table, dict) or table.get("format") != ENTRY_FORMAT:
        raise ValueError(f"entry format {table.get('format')!r}, expected {ENTRY_FORMAT}")
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, crc in table["arrays"]:
        a = np.load(f, allow_pickle=False)
        if a.dtype.str != dtype or list(a.shape) != shape:
            raise ValueError(f"{name}: {a.dtype.str} {list(a.shape)}, table says {dtype} {shape}")
        if _crc(a) != crc:
            raise ValueError(f"{name}: checksum mismatch")
        out[str(name)] = a
    if f.read(1):
        raise ValueError("trailing bytes after the last array")
    return out


def _to_arrays(item: Mapping[str, Any]) -> dict[str, np.ndarray]:
    # np.asarray of a CPU float32 tensor is a view: the image is written without a copy.
    out = {k: np.asarray(torch.as_tensor(item[k]).cpu(), dtype=t) for k, t in _ARRAYS.items()}
    out["subject_id"] = np.asarray(str(item["subject_id"]))
    out["has_seg"] = np.asarray(bool(item["has_seg"]))
    out["seg_checked"] = np.asarray(bool(item.get("seg_checked", False)))
    if item.get("quality") is not None:
        out["quality"] = np.asarray(item["quality"], dtype=np.float64)
    if item.get("mid_slices") is not None:
        out["mid_slices"] = np.asarray(item["mid_slices"], dtype=np.float32)
    return out


def _from_arrays(d: Mapping[str, np.ndarray]) -> dict:
    missing = sorted((set(_ARRAYS) | {"subject_id", "has_seg", "seg_checked"}) - set(d))
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    for k, t in _ARRAYS.items():
        if d[k].dtype != np.dtype(t):
            raise ValueError(f"{k} has dtype {d[k].dtype}, expected {np.dtype(t)}")
    image, brain, positions = d["image"], d["brain"], d["positions"]
    if image.ndim != 4 or brain.shape != (1, *image.shape[1:]) or d["affine"].shape != (4, 4):
        raise ValueError(f"inconsistent shapes image {image.shape}, brain {brain.shape}")
    if positions.ndim != 2 or positions.shape[1] != 3 or d["grid"].shape != (3,):
        raise ValueError(f"positions of shape {positions.shape}, grid {d['grid'].shape}")
    quality = None
    if "quality" in d:
        quality = d["quality"]
        if quality.dtype != np.float64 or quality.shape != (len(QUALITY_COLUMNS),):
            raise ValueError(f"quality row of dtype {quality.dtype} and shape {quality.shape}")
    mid_slices = d.get("mid_slices")
    if mid_slices is not None and (mid_slices.dtype != np.float32 or mid_slices.ndim != 3):
        raise ValueError(f"middle slices of dtype {mid_slices.dtype} and shape {mid_slices.shape}")
    return {
        "quality": quality,
        "mid_slices": mid_slices,
        "seg_checked": bool(d["seg_checked"]),
        "subject_id": str(d["subject_id"]),
        # np.load reads each record into a fresh, writable, C-contiguous array: no copy here.
        "image": torch.from_numpy(image),
        "brain": torch.from_numpy(brain),
        "has_seg": bool(d["has_seg"]),
        "affine": torch.from_numpy(d["affine"]),
        "crop_start": [int(v) for v in d["crop_start"]],
        "ras_shape": [int(v) for v in d["ras_shape"]],
        "spacing": [float(v) for v in d["spacing"]],
        "fingerprint": d["fingerprint"],
        "positions": torch.from_numpy(positions),
        "grid": tuple(float(v) for v in d["grid"]),
    }


def _grid(preprocessing: PreprocessingConfig) -> tuple[float, float, float]:
    return (
        float(preprocessing.patch_size),
        float(preprocessing.stride),
        float(preprocessing.min_brain_fraction),
    )


def eval_positions(
    item: Mapping[str, Any], preprocessing: PreprocessingConfig, device: torch.device | str
) -> torch.Tensor:
    """The evaluation-grid positions of a preprocessed subject on ``device``: those the item
    carries (``positions``, computed for the same patch size, stride and minimum brain fraction:
    ``grid``), else :func:`aad_med.data.patches.eval_patch_positions` of its brain mask."""
    positions = item.get("positions")
    if positions is not None and tuple(item.get("grid", ())) == _grid(preprocessing):
        return torch.as_tensor(positions).to(device)
    brain = torch.as_tensor(item["brain"]).as_subclass(torch.Tensor).to(device)
    return eval_patch_positions(
        brain, preprocessing.patch_size, preprocessing.stride, preprocessing.min_brain_fraction
    )


def usable(quality: Any, seg_checked: bool, wanted: Any) -> bool:
    """Whether a cached result (one subject's item, or a cohort's embedding) holds what
    ``wanted`` (settings with ``quality`` and ``check_seg``) asks for: the quality rows, and a
    segmentation decoded and checked (quality rows imply it)."""
    if getattr(wanted, "quality", False) and quality is None:
        return False
    return bool(seg_checked) or quality is not None or not getattr(wanted, "check_seg", False)


class PreprocessedSubjects(torch.utils.data.Dataset):
    """Subject records -> embedding items (:data:`EMBED_KEYS` plus ``timings``), through
    ``cache`` when given.

    Each volume is decoded once: the intensity fingerprint (and, with ``quality``, the
    image-quality row) is computed from the same decoded arrays the preprocessing then
    normalises. ``timings`` holds the seconds of ``decode``, ``fingerprint``, ``quality`` and
    ``preprocessing`` (``cache_read`` instead on a hit; a hit without the quality row asked for
    is recomputed and replaced).

    Args:
        records: the subjects.
        preprocessing: the preprocessing settings.
        cache: the preprocessed-subject cache, or ``None``.
        quality: also decode the segmentation and compute the image-quality row.
        check_seg: also decode the segmentation to check its voxels and labels (an
            :class:`~aad_med.errors.InputError` naming the file); a cache entry written without
            that check is recomputed.

    Raises (on item access):
        InputError: a subject's file is missing, unreadable or inconsistent (named).
    """

    def __init__(
        self,
        records: Sequence[SubjectRecord],
        preprocessing: PreprocessingConfig,
        cache: PreprocessedCache | None = None,
        quality: bool = False,
        check_seg: bool = False,
    ):
        self.records = list(records)
        self.preprocessing = preprocessing
        self.cache = cache
        # The inputs' digests (the keys' content part) kept next to the entries, so a second
        # comparison does not hash every input file again.
        self.digests = (
            DigestMemo(cache.root / "digests", write=cache.mode == "write") if cache else None
        )
        self.quality = quality
        self.check_seg = check_seg or quality
        self.load = LoadSubjectd(
            load_seg=self.check_seg,
            target_spacing=preprocessing.spacing,
            patch_size=preprocessing.patch_size,
        )
        self.prepare = FusedPreprocessd(preprocessing)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        key = None
        if self.cache is not None:
            key = subject_key(record, self.preprocessing, self.digests)
            t0 = time.perf_counter()
            hit = self.cache.get(key)
            if hit is not None and usable(hit["quality"], hit["seg_checked"], self):
                hit["timings"] = {"cache_read": time.perf_counter() - t0}
                return hit
        item = self.compute(record)
        if self.cache is not None and key is not None:
            t0 = time.perf_counter()
            self.cache.put(key, item)
            item["timings"]["cache_write"] = time.perf_counter() - t0
        return item

    def compute(self, record: SubjectRecord) -> dict:
        """Decode, fingerprint and preprocess one subject (no cache)."""
        t0 = time.perf_counter()
        loaded = self.load(record.as_dict())
        t1 = time.perf_counter()
        raw = loaded["image"].as_tensor().numpy()
        fingerprint = fingerprint_row(raw)
        t2 = time.perf_counter()
        quality = None
        if self.quality:
            seg = loaded["seg"].as_tensor().numpy()[0] if loaded["has_seg"] else None
            quality, problem = quality_row(raw, seg)
            if problem is not None:
                log.warning(
                    "subject %s: image-quality metrics undefined (%s)", record.subject_id, problem
                )
        t3 = time.perf_counter()
        item = self.prepare(loaded)
        del loaded, raw
        item.pop("seg", None)
        item["has_seg"] = record.seg is not None
        item["fingerprint"] = fingerprint
        item["quality"] = quality
        item["seg_checked"] = self.check_seg
        # The channels' middle slices the decode kept, for the report's thumbnails: stored with
        # the entry (and carried back from a loader worker), so no run re-reads a file for them.
        item["mid_slices"] = MID_SLICES.subject_slices(record)
        t4 = time.perf_counter()
        # The grid is a function of the brain mask and the settings in the key: kept with it
        # (counted as ``features``, the phase that builds it when an item has none).
        item["grid"] = _grid(self.preprocessing)
        item["positions"] = eval_positions({"brain": item["brain"]}, self.preprocessing, "cpu")
        t5 = time.perf_counter()
        item["timings"] = {
            "decode": t1 - t0,
            "fingerprint": t2 - t1,
            "preprocessing": t4 - t3,
            "features": t5 - t4,
        }
        if self.quality:
            item["timings"]["quality"] = t3 - t2
        return item
