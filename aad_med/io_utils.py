"""Small file helpers every stage shares, each written once: the atomic writer, JSON-ready
conversion, file hashes (remembered across runs by :class:`DigestMemo`), the cache key of a set
of files and the reading/writing of a cache entry that heals (:func:`read_cache_entry`,
:func:`write_cache_entry`).

Nothing here knows about cohorts, models or statistics; it must not import torch, MONAI or
matplotlib (the console scripts validate their input before those heavy imports).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from aad_med.errors import InputError

T = TypeVar("T")


class CacheWarning(UserWarning):
    """A cache entry was unreadable and recomputed, or a cache folder is unusable (the run goes
    on uncached). Caches never fail a run."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The hidden temporary name :func:`atomic_path` writes ``path`` under (same folder, so the
    final rename is atomic; unique per process and call)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; on success rename it over ``path`` and
    (``durable``) fsync the folder, on any exception (KeyboardInterrupt included) remove it.

    A reader never sees half a file; a process killed mid-write leaves only the hidden temporary
    file (``.NAME.tmp-PID-HEX``), which :func:`aad_med.training.checkpoint.remove_stale_temp_files`
    clears for checkpoints. ``durable=False`` keeps the atomic rename but not the folder fsync
    (for cache entries, which heal: see :func:`write_cache_entry`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_path`).

    Raises:
        InputError: the file cannot be written (names ``path``).
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise InputError(path, f"cannot write ({e.strerror or e})") from None
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (no newline translation)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy types, tuples and paths to JSON primitives; non-finite floats
    become ``None`` (strict JSON has no NaN)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer | int):
        return int(obj)
    if isinstance(obj, np.floating | float):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | Path, payload: Mapping) -> Path:
    """Write ``payload`` as indented strict JSON (``allow_nan=False``), atomically.

    Raises:
        InputError: the file cannot be written (names ``path``).
    """
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False)
    return write_text_atomic(path, text + "\n")


def write_nifti_atomic(path: str | Path, data: Any, affine: Any) -> Path:
    """Write ``data`` as NIfTI (gzipped for ``.gz``) atomically; identical inputs give identical
    bytes (no time stamp or file name in the gzip header), with scanner-space q/s-forms in mm."""
    import gzip
    import io

    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=1, mtime=0) as gz:
            gz.write(raw)
        raw = buf.getvalue()
    return write_bytes_atomic(path, raw)


def checkpoint_path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be a checkpoint file (one line naming it), or ``None`` when it can.

    Distinguishes a missing file, a broken symbolic link, a folder, and something that is not a
    regular file (a device or FIFO, which ``torch.load`` would read forever). Here, torch-free,
    so commands check their checkpoints before importing torch (re-exported by
    :mod:`aad_med.training.checkpoint`).
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"{path}: checkpoint is a broken symbolic link (to {os.readlink(path)})"
    if not path.exists():
        return f"{path}: checkpoint does not exist"
    if path.is_dir():
        return f"{path}: is a folder, expected a checkpoint file (.pt)"
    if not path.is_file():
        return f"{path}: checkpoint is not a regular file (a device, FIFO or socket)"
    return None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_DIGESTS: dict[tuple, str] = {}
"""In-process memo of :func:`file_digest`, keyed by the file's identity and its status-change
time, which the kernel sets on every write and no user tool can restore (``cp -p``, ``rsync -t``
and ``touch`` restore only the modification time)."""


def _identity(path: str | Path) -> tuple:
    """What :func:`file_digest` remembers a digest under: the file's identity and its
    status-change time (any write moves it)."""
    st = os.stat(path)
    return (
        os.path.realpath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (as :func:`file_sha256`), remembered per process while the file
    is unchanged: for cache keys (the content, not its size and mtime) and for the checkpoint
    hash a run records in several places.

    Size + modification time is not a content key: ``cp -p``, ``rsync -t`` and coarse time stamps
    give other bytes the same pair, and a cache keyed on it serves stale results. The whole file
    is hashed (a sampled digest would miss a change between samples). Measured side by side on a
    BraTS-size subject (four 240x240x155 int16 ``.nii.gz`` of 3.8 MB each, one process on a
    shared CPU): hashing costs 0.04-0.05 of decoding them (21 ms vs 440-490 ms); for
    uncompressed ``.nii`` (17.8 MB each) it costs 1.7x nibabel's ``get_fdata`` (113 vs 68 ms),
    still small beside resampling and encoding. Memoised per process (:data:`_DIGESTS`), so the
    embedding, intensity and training caches of one run hash a file once; across runs,
    :class:`DigestMemo` (the embedding caches use one).

    Raises:
        OSError: the file cannot be read.
    """
    memo = _identity(path)
    if memo not in _DIGESTS:
        digest = file_sha256(path)
        # A file written while it was read has moved on: its digest is not remembered.
        if _identity(path) != memo:
            return digest
        _DIGESTS[memo] = digest
    return _DIGESTS[memo]


class DigestMemo:
    """Digests of input files kept across runs in a folder (a cache's ``digests/``), so a second
    comparison of the same cohorts does not hash every input again (16 BraTS subjects: 0.5 s).

    One small JSON file per group of files (a subject's), named by the :func:`cache_key` of
    the files' identities (:func:`_identity`: real path, device, inode, size, modification and
    status-change times); a file is found again only while all of them are unchanged. The
    status-change time is set by the kernel on every write and cannot be restored (``cp -p``,
    ``rsync -t``, ``touch`` and ``os.utime`` restore only the modification time), so an edited
    or replaced file is hashed again. The memo heals: a missing, unreadable or malformed file
    (not JSON, other identities, not 64 hex digits) is ignored and, when ``write``, rewritten
    atomically. Never pickle; never fails a run (a folder that cannot be written is skipped).

    Args:
        folder: where the memo files live (created on the first write).
        write: add memo files (``False`` for a read-only cache).
    """

    def __init__(self, folder: str | Path, write: bool = True):
        self.folder = Path(folder)
        self.write = write

    def _path(self, identities: list) -> Path:
        return self.folder / f"{cache_key(identities)}.json"

    def digests(self, paths: Iterable[str | Path]) -> list[str]:
        """The SHA-256 of each file, from the process memo, this folder or the bytes.

        Raises:
            OSError: a file cannot be read.
        """
        paths = list(paths)
        identities = [list(_identity(p)) for p in paths]
        known = [_DIGESTS.get(tuple(i)) for i in identities]
        if all(d is not None for d in known):
            return known
        path = self._path(identities)
        stored = self._read(path, identities)
        if stored is not None:
            for i, d in zip(identities, stored, strict=True):
                _DIGESTS[tuple(i)] = d
            return stored
        digests = [file_digest(p) for p in paths]
        if self.write and all(tuple(i) in _DIGESTS for i in identities):
            doc = {"files": identities, "sha256": digests}
            with contextlib.suppress(OSError):
                self.folder.mkdir(parents=True, exist_ok=True)
                with atomic_path(path, durable=False) as tmp:
                    tmp.write_text(json.dumps(doc), encoding="utf-8")
        return digests

    @staticmethod
    def _read(path: Path, identities: list) -> list[str] | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("files") != identities:
            return None
        digests = doc.get("sha256")
        if not isinstance(digests, list) or len(digests) != len(identities):
            return None
        for d in digests:
            if not (isinstance(d, str) and len(d) == 64 and set(d) <= set("0123456789abcdef")):
                return None
        return digests


def file_stats(paths: Iterable[str | Path], memo: DigestMemo | None = None) -> list[list]:
    """``[resolved path, size, modification time in ns, SHA-256 of the content]`` per file
    (``[path, None, None, None]`` for one that cannot be read): what a cache key covers so that
    an edited file invalidates it, even one whose size and mtime were restored
    (:func:`file_digest`). ``memo`` keeps the digests across runs (:class:`DigestMemo`)."""
    paths = list(paths)
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns, None])
        except OSError:
            out.append([str(p), None, None, None])
    readable = [i for i, row in enumerate(out) if row[1] is not None]
    try:
        if memo is not None:
            digests = memo.digests([paths[i] for i in readable])
        else:
            digests = [file_digest(paths[i]) for i in readable]
    except OSError:  # unreadable content: hashed one by one to find which
        digests = []
        for i in readable:
            try:
                digests.append(file_digest(paths[i]))
            except OSError:
                out[i] = [str(paths[i]), None, None, None]
                digests.append(None)
    for i, d in zip(readable, digests, strict=True):
        if d is not None:
            out[i][3] = d
    return out


def cache_key(payload: Any) -> str:
    """The 40-hex-digit cache key of a JSON-serialisable ``payload`` (keys sorted, so equal
    content gives equal keys; objects JSON cannot write are keyed by ``str``).

    Files enter a payload through :func:`file_stats` (or :func:`file_digest`), which carry their
    content digest: keys never rest on size and modification time alone.
    """
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def _problem_text(e: BaseException) -> str:
    if isinstance(e, PermissionError):
        return f"not readable ({e.strerror or e})"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def read_cache_entry(path: str | Path, read: Callable[[Path], T], what: str) -> T | None:
    """Read one cache entry with ``read(path)``, healing the cache when it cannot.

    ``read`` loads and checks the entry and raises on anything wrong with it (truncated, emptied,
    flipped bytes, wrong shape, written for other data). Any such failure is the cache's, never
    the input data's: a :class:`CacheWarning` naming the entry, the entry is deleted, and
    ``None`` tells the caller to recompute it.

    Args:
        path: the entry's file.
        read: loader and checker of the entry.
        what: what the cache holds, for the warning (``"embedding cache"``).

    Returns:
        What ``read`` returned, or ``None`` when the entry is missing or was unusable.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    try:
        if not path.is_file():
            raise IsADirectoryError(f"{path} is not a regular file")
        return read(path)
    except Exception as e:  # noqa: BLE001 - any failure of a cache entry means "recompute it"
        problem = _problem_text(e)
    warnings.warn(
        f"{path}: unusable {what} entry ({problem}); deleting and recomputing it",
        CacheWarning,
        stacklevel=2,
    )
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    return None


_UNWRITABLE_WARNED: set[tuple[str, str]] = set()


def write_cache_entry(path: str | Path, write: Callable[[IO[bytes]], None], what: str) -> bool:
    """Write one cache entry atomically with ``write(file)``; a cache folder that cannot take it
    (read-only, a file in its place, disk full) is a :class:`CacheWarning` (once per folder, cache
    and process) and the run goes on uncached.

    Entries are renamed into place atomically but not fsync'd: a crash may lose an entry or
    leave one unreadable (never a half-written one under its name during a run), and readers
    (:func:`read_cache_entry`) delete and recompute such entries, so durability buys nothing
    here. The folder fsync cost 0-53 ms (20 ms mean) per 52 MB preprocessed entry on this
    machine's ext4 (BENCHMARKS.md, "Encoding at BraTS size").

    Returns:
        Whether the entry was written.
    """
    path = Path(path)
    try:
        with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as f:
            write(f)
            f.flush()
    except OSError as e:
        folder = str(path.parent)
        if (folder, what) not in _UNWRITABLE_WARNED:
            _UNWRITABLE_WARNED.add((folder, what))
            warnings.warn(
                f"{folder}: cannot write the {what} ({e.strerror or e}); continuing without it",
                CacheWarning,
                stacklevel=2,
            )
        return False
    return True
