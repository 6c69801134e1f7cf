"""Small file helpers every stage shares, each written once: the atomic writer, JSON-ready
conversion, file hashes and the cache key of a set of files.

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
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from aad_med.errors import InputError


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
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write; on success rename it over ``path`` and
    fsync the folder, on any exception (KeyboardInterrupt included) remove it.

    A reader never sees half a file; a process killed mid-write leaves only the hidden temporary
    file (``.NAME.tmp-PID-HEX``), which :func:`aad_med.training.checkpoint.remove_stale_temp_files`
    clears for checkpoints.
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


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stats(paths: Iterable[str | Path]) -> list[list]:
    """``[resolved path, size, modification time in ns]`` per file (``[path, None, None]`` for
    one that cannot be read): what a cache key covers so that an edited file invalidates it."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(p), None, None])
    return out


def cache_key(payload: Any) -> str:
    """The 40-hex-digit cache key of a JSON-serialisable ``payload`` (keys sorted, so equal
    content gives equal keys; objects JSON cannot write are keyed by ``str``)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]
