"""Dataset stage: cohorts of :class:`~aad_med.data.records.SubjectRecord` -> torch datasets of
preprocessed subjects (evaluation) or of random patches (training), with MONAI caching.

Which cache to use:

- ``"memory"`` (:class:`monai.data.CacheDataset`): the deterministic part (load, RAS, resample,
  crop, z-score) of every subject is computed once when the dataset is built and kept in RAM.
  Fastest per epoch; use it for small cohorts (synthetic, tests, a few hundred cropped BraTS
  subjects at 1 mm is ~5-8 MB each) and when training for many epochs.
- ``"disk"`` (:class:`monai.data.PersistentDataset`): the deterministic result of each subject
  is written once to ``cache_dir`` as a ``.pt`` file (read back with ``weights_only=True``),
  keyed by a hash of the record dict, the files' size and modification time, and the
  :class:`~aad_med.data.preprocessing.PreprocessingConfig`. Use it for cohorts that do not fit
  in RAM or when several runs (training, then embedding) reuse the same preprocessing.
  Changing a file or the config gives a new key; stale entries are never read. An entry that
  is unreadable or malformed is a :class:`CacheWarning`, deleted and recomputed; an unusable
  cache folder (read-only, a file) means running uncached with a warning.
- ``"none"`` (:class:`monai.data.Dataset`): preprocess on every access. Use it for a single
  pass (embedding a cohort once) where a cache would only cost memory.

All three give identical items. Training datasets also cache the look-up tables of the patch
sampler (:data:`~aad_med.data.patches.SAMPLING_KEYS`: brain integral image, brain and tumour
voxel indices), so cached epochs only draw and cut patches; this adds about a third to the
memory of each cached subject. Their disk-cache entries have their own keys, so evaluation
entries (without the tables) are unchanged and never mixed up with them.

Randomness (training patches) depends only on
``(seed, epoch, subject index)``, so the same seed gives the same patches whatever the
number of DataLoader workers or the order of access; call :meth:`PatchDataset.set_epoch`
before each epoch (the workers of a non-persistent DataLoader see the new epoch).

This module reads files only through the transforms; it writes only the disk cache.

Size: the three cache flavours share the record hashing, the healing of damaged entries and the
projection of worker errors, so they stay in one module.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose

from aad_med.data.patches import PATCH_KEYS, SAMPLING_KEYS, AddSamplingIndexd, train_transforms
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.data.transforms import (
    PREPROCESSED_KEYS,
    SafeCompose,
    deterministic_transforms,
    find_project_error,
)
from aad_med.errors import AADError, ConfigError, InputError
from aad_med.io_utils import CacheWarning, cache_key, file_digest

__all__ = [
    "CACHE_MODES",
    "CacheWarning",
    "PATCH_KEYS",
    "PREPROCESSED_KEYS",
    "PatchDataset",
    "WorkerInputError",
    "build_eval_dataset",
    "build_subject_dataset",
    "build_train_dataset",
    "record_hash",
    "train_collate",
]

CACHE_MODES = ("memory", "disk", "none")
CACHE_VERSION = 1
"""Bumped whenever the deterministic transforms change what they produce (invalidates disk caches)."""


class RecordHasher:
    """Disk-cache key of a record dict: its content, its files' size, mtime and content digest, the config and
    the variant of the cached output.

    A class rather than a closure so the dataset stays picklable for DataLoader workers.
    """

    def __init__(self, cfg: PreprocessingConfig, variant: str = ""):
        self.cfg_json = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        self.variant = variant

    def __call__(self, item: dict) -> bytes:
        return record_hash(item, self.cfg_json, self.variant).encode("utf-8")


def record_hash(item: dict, cfg_json: str, variant: str = "") -> str:
    """Hex digest identifying one subject's preprocessing input (files + config).

    ``variant`` names extra cached content (``"sampling_index"`` for training items); the empty
    default gives the keys of plain preprocessed subjects.
    """
    stats = {}
    for key, value in sorted(item.items()):
        if isinstance(value, str) and value and key != "subject_id":
            try:
                st = os.stat(value)
                stats[key] = [st.st_size, st.st_mtime_ns, file_digest(value)]
            except OSError:
                stats[key] = None
    fields = {"v": CACHE_VERSION, "item": item, "stats": stats, "cfg": cfg_json}
    if variant:
        fields["variant"] = variant
    return cache_key(fields)


class WorkerInputError(InputError):
    """An :class:`~aad_med.errors.InputError` that survives a ``DataLoader`` worker.

    torch re-creates a worker's exception in the main process as ``type(e)(formatted_traceback)``
    and falls back to a bare ``RuntimeError`` when that fails, which a plain ``InputError``
    (two arguments) does. In a worker the error carries its path and problem as JSON after a tag;
    the main process parses them back, so the user still gets the one-line ``path: problem``.
    """

    TAG = "aad-med-input-error:"

    def __init__(self, path: str | Path, problem: str | None = None):
        if problem is None:
            path, problem = self._parse(str(path))
        super().__init__(path, problem)

    @classmethod
    def for_worker(cls, error: InputError) -> WorkerInputError:
        """The error to raise inside a worker in place of ``error``."""
        out = cls(error.path, error.problem)
        out.args = (cls.TAG + json.dumps([error.path, error.problem]),)
        return out

    @classmethod
    def _parse(cls, report: str) -> tuple[str, str]:
        at = report.rfind(cls.TAG)
        if at >= 0:
            line = report[at + len(cls.TAG) :].splitlines()[0]
            try:
                path, problem = json.loads(line)
                return str(path), str(problem)
            except (ValueError, TypeError):
                pass
        lines = [ln for ln in report.strip().splitlines() if ln.strip()]
        return "<DataLoader worker>", lines[-1] if lines else report


def _reraise(error: AADError) -> None:
    if isinstance(error, InputError) and torch.utils.data.get_worker_info() is not None:
        raise WorkerInputError.for_worker(error) from None
    raise error from None


class _ProjectErrors:
    """Mixin: MONAI datasets wrap transform failures in ``RuntimeError``; re-raise ours as is
    (as :class:`WorkerInputError` inside a DataLoader worker). Items are shallow copies, so a
    caller replacing a key (``d["image"] = d["image"].cuda()``) never edits the memory cache."""

    def _transform(self, index: int):
        try:
            item = super()._transform(index)
        except AADError as e:
            _reraise(e)
        except RuntimeError as e:
            cause = find_project_error(e)
            if cause is None:
                raise
            _reraise(cause)
        return dict(item) if isinstance(item, dict) else item


class SubjectDataset(_ProjectErrors, Dataset):
    """:class:`monai.data.Dataset` (no cache) that raises the project's errors unwrapped."""


class CachedSubjectDataset(_ProjectErrors, CacheDataset):
    """:class:`monai.data.CacheDataset` (memory cache) that raises the project's errors unwrapped.

    The cache is filled serially (``num_workers <= 1``) or by a thread pool that lets running
    subjects finish when one fails: MONAI's pool abandons them, and a torch op still running in
    an abandoned thread aborts the interpreter at exit (``terminate called ...``, exit 134)
    instead of letting the CLI report the bad file.
    """

    def _fill_cache(self, indices=None) -> list:
        if self.cache_num <= 0:
            return []
        if indices is None:
            indices = list(range(self.cache_num))
        workers = self.num_workers or 1
        if workers <= 1:
            return [self._load_cache_item(i) for i in indices]
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self._load_cache_item, i) for i in indices]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


_UNREADABLE = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    AttributeError,
    TypeError,
    IndexError,
    zipfile.BadZipFile,
)


def _cache_entry_problem(entry: object, sampling_index: bool) -> str | None:
    """Why a loaded cache entry cannot be a preprocessed subject (``None`` when it can)."""
    if not isinstance(entry, dict):
        return f"holds a {type(entry).__name__}, not a subject dict"
    keys = (*PREPROCESSED_KEYS, *(SAMPLING_KEYS if sampling_index else ()))
    missing = [k for k in keys if k not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    image, seg, brain = entry["image"], entry["seg"], entry["brain"]
    if not all(isinstance(t, torch.Tensor) for t in (image, seg, brain)):
        return "image, seg or brain is not a tensor"
    if image.ndim != 4 or image.shape[0] != len(PreprocessingConfig().channels):
        return f"image has shape {tuple(image.shape)}, expected (4, X, Y, Z)"
    if image.dtype != torch.float32 or seg.dtype != torch.int16 or brain.dtype != torch.uint8:
        return "unexpected tensor dtypes"
    grid = (1, *image.shape[1:])
    if tuple(seg.shape) != grid or tuple(brain.shape) != grid:
        return f"seg {tuple(seg.shape)} or brain {tuple(brain.shape)} do not match the image"
    return None


class PersistentSubjectDataset(_ProjectErrors, PersistentDataset):
    """:class:`monai.data.PersistentDataset` (disk cache) that raises the project's errors
    unwrapped and heals its cache.

    An entry that cannot be read (truncated, emptied, flipped bytes, a pickle payload refused by
    ``weights_only`` loading) or does not hold a preprocessed subject of the expected form is a
    :class:`CacheWarning`, is deleted and recomputed: never a failure. Entries are written to a
    temporary file in the cache folder and renamed into place, so readers never see a partial
    one; a write that fails (read-only folder, disk full) is a warning and the item is used
    uncached.
    """

    def __init__(self, *args, sampling_index: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampling_index = sampling_index
        self._write_warned = False

    def _cachecheck(self, item_transformed):
        key = self.hash_func(item_transformed).decode("utf-8") + self.transform_hash
        hashfile = Path(self.cache_dir) / f"{key}.pt"
        if hashfile.is_file():
            entry = self._read_entry(hashfile)
            if entry is not None:
                return entry
        item = self._pre_transform(deepcopy(item_transformed))
        self._write_entry(hashfile, item)
        return item

    def _read_entry(self, hashfile: Path) -> dict | None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                entry = torch.load(hashfile, map_location="cpu", weights_only=True)
            problem = _cache_entry_problem(entry, self.sampling_index)
        except PermissionError as e:
            problem = f"not readable ({e.strerror or e})"
        except _UNREADABLE as e:
            text = str(e).strip().splitlines()
            problem = f"unreadable ({type(e).__name__}: {text[0][:120] if text else ''})"
        if problem is None:
            return entry
        warnings.warn(
            f"{hashfile}: corrupt disk-cache entry ({problem}); deleting and recomputing it",
            CacheWarning,
            stacklevel=2,
        )
        with contextlib.suppress(OSError):
            hashfile.unlink()
        return None

    def _write_entry(self, hashfile: Path, item: dict) -> None:
        tmp = hashfile.with_name(f".{hashfile.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "wb") as f:
                torch.save(item, f)
            os.replace(tmp, hashfile)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._write_warned:
                self._write_warned = True
                warnings.warn(
                    f"{hashfile.parent}: cannot write the disk cache ({e.strerror or e}); "
                    "continuing without caching",
                    CacheWarning,
                    stacklevel=2,
                )


def _usable_cache_dir(cache_dir: Path) -> str | None:
    """Why ``cache_dir`` cannot hold the disk cache (``None`` when it can); creates it."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "exists and is not a folder"
    except OSError as e:
        return f"cannot be created ({e.strerror or e})"
    if not cache_dir.is_dir():
        return "exists and is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".probe-"):
            pass
    except OSError as e:
        return f"is not writable ({e.strerror or e})"
    return None


def _record_dicts(records: Sequence[SubjectRecord | dict]) -> list[dict]:
    return [r.as_dict() if isinstance(r, SubjectRecord) else dict(r) for r in records]


def build_subject_dataset(
    records: Sequence[SubjectRecord | dict],
    cfg: PreprocessingConfig,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    sampling_index: bool = False,
) -> torch.utils.data.Dataset:
    """Dataset of preprocessed subjects (deterministic transforms only), cached as requested.

    Args:
        records: the subjects (records or their ``as_dict()``).
        cfg: preprocessing contract.
        cache: ``"memory"``, ``"disk"`` or ``"none"`` (see the module docstring).
        cache_dir: folder of the disk cache (required for ``"disk"``; created if missing).
        num_workers: threads used to fill the memory cache.
        sampling_index: also compute (and cache) the patch sampler's look-up tables
            (:data:`~aad_med.data.patches.SAMPLING_KEYS`), for training.

    Returns:
        A dataset whose item ``i`` is the dict of :data:`PREPROCESSED_KEYS` for ``records[i]``
        (plus :data:`~aad_med.data.patches.SAMPLING_KEYS` with ``sampling_index``).

    Raises:
        ConfigError: unknown cache mode, or ``"disk"`` without ``cache_dir``.
        InputError: (for ``"memory"``, while building) a file of a subject is bad.
    """
    data = _record_dicts(records)
    transform = deterministic_transforms(cfg)
    variant = ""
    if sampling_index:
        transform = SafeCompose([*transform.transforms, AddSamplingIndexd()], log_stats=False)
        variant = "sampling_index"
    if cache == "memory":
        try:
            return CachedSubjectDataset(
                data,
                transform,
                cache_rate=1.0,
                num_workers=max(1, num_workers),
                progress=False,
                copy_cache=False,
            )
        except RuntimeError as e:
            cause = find_project_error(e)
            if cause is None:
                raise
            raise cause from None
    if cache == "disk":
        if cache_dir is None:
            raise ConfigError(
                "cache='disk' needs cache_dir (a folder for the preprocessed subjects)"
            )
        cache_dir = Path(cache_dir)
        problem = _usable_cache_dir(cache_dir)
        if problem:
            warnings.warn(
                f"{cache_dir}: disk cache folder {problem}; running without the disk cache",
                CacheWarning,
                stacklevel=2,
            )
            return SubjectDataset(data, transform)
        return PersistentSubjectDataset(
            data,
            transform,
            cache_dir=cache_dir,
            hash_func=RecordHasher(cfg, variant),
            weights_only=True,
            sampling_index=sampling_index,
        )
    if cache == "none":
        return SubjectDataset(data, transform)
    raise ConfigError(f"unknown cache {cache!r}; choose one of {list(CACHE_MODES)}")


class PatchDataset(torch.utils.data.Dataset):
    """Training dataset: item ``i`` is the list of ``samples_per_subject`` patch dicts
    (:data:`PATCH_KEYS`) drawn from subject ``i``; batch it with :func:`train_collate`.

    Randomness is seeded from ``(seed, epoch, i)`` on every access, so results do not depend on
    workers or access order.
    """

    def __init__(
        self,
        subjects: torch.utils.data.Dataset,
        random_transform: Compose,
        seed: int = 0,
    ):
        self.subjects = subjects
        self.random_transform = random_transform
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.subjects)

    def set_epoch(self, epoch: int) -> None:
        """Draw the patches of epoch ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def set_random_state(self, seed: int) -> PatchDataset:
        """Reseed: the same seed gives the same patches."""
        self.seed = int(seed)
        return self

    def item_seed(self, index: int) -> int:
        """The RNG seed used for subject ``index`` in the current epoch."""
        seq = np.random.SeedSequence([self.seed, self.epoch, int(index) % max(1, len(self))])
        return int(seq.generate_state(1, dtype=np.uint32)[0])

    def __getitem__(self, index: int) -> list[dict]:
        subject = self.subjects[index]
        self.random_transform.set_random_state(seed=self.item_seed(index))
        samples = self.random_transform(subject)
        return samples if isinstance(samples, list) else [samples]


def build_train_dataset(
    records: Sequence[SubjectRecord | dict],
    cfg: PreprocessingConfig,
    samples_per_subject: int = 8,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    tumour_ratio: float = 0.3,
    augment: dict | None = None,
    num_workers: int = 0,
    seed: int = 0,
) -> PatchDataset:
    """Training patches: the cached deterministic part (with the sampler's look-up tables), then
    random patch sampling.

    Each item is one subject's list of ``samples_per_subject`` patch dicts; use
    ``DataLoader(ds, batch_size=B, collate_fn=train_collate)`` to get ``B * S`` patches a batch.

    Args:
        records: training subjects.
        cfg: preprocessing contract (patch size, minimum brain fraction, spacing).
        samples_per_subject: patches per subject per epoch.
        cache: ``"memory"``, ``"disk"`` or ``"none"``.
        cache_dir: disk cache folder (``cache="disk"``).
        tumour_ratio: share of patches centred on the tumour for subjects with a seg.
        augment: ``None`` (off) or a dict like :data:`aad_med.data.patches.DEFAULT_AUGMENT`.
        num_workers: threads used to fill the memory cache.
        seed: patch sampling seed.
    """
    subjects = build_subject_dataset(
        records, cfg, cache, cache_dir, num_workers, sampling_index=True
    )
    rand = train_transforms(cfg, samples_per_subject, tumour_ratio=tumour_ratio, augment=augment)
    return PatchDataset(subjects, rand, seed=seed)


def build_eval_dataset(
    records: Sequence[SubjectRecord | dict],
    cfg: PreprocessingConfig,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
) -> torch.utils.data.Dataset:
    """Preprocessed subjects one by one (keys :data:`PREPROCESSED_KEYS`), for embedding with
    :func:`aad_med.data.patches.eval_patch_grid`. Same arguments as
    :func:`build_subject_dataset`; ``"none"`` suits a single pass."""
    return build_subject_dataset(records, cfg, cache, cache_dir, num_workers)


def train_collate(batch: list[list[dict]] | list[dict]) -> dict:
    """Stack a batch of subjects' patch lists into one dict of ``B * S`` patches.

    Returns:
        ``image`` ``(B*S, 4, p, p, p)`` float32, ``seg`` ``(B*S, 1, p, p, p)`` int16, ``brain``
        ``(B*S, 1, p, p, p)`` uint8, ``patch_start`` ``(B*S, 3)`` int64, ``patch_tumour``
        ``(B*S,)`` bool, ``has_seg`` ``(B*S,)`` bool, ``subject_id`` list of ``B*S`` str.
    """
    flat: list[dict] = []
    for item in batch:
        flat.extend(item if isinstance(item, list) else [item])
    if not flat:
        raise ValueError("train_collate got an empty batch")

    def stack(key):
        return torch.stack([torch.as_tensor(s[key]).as_subclass(torch.Tensor) for s in flat])

    return {
        "image": stack("image").to(torch.float32),
        "seg": stack("seg"),
        "brain": stack("brain"),
        "patch_start": stack("patch_start").to(torch.int64),
        "patch_tumour": torch.tensor([bool(s["patch_tumour"]) for s in flat]),
        "has_seg": torch.tensor([bool(s["has_seg"]) for s in flat]),
        "subject_id": [str(s["subject_id"]) for s in flat],
    }
