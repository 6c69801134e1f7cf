"""Writing machine-readable results: JSON made of primitives only (numpy scalars and arrays
converted, NaN/Inf written as ``null``), NIfTI volumes, CSV tables. Every file is written under a
temporary name and renamed, so readers never see half a file."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def to_jsonable(obj):
    """Recursively convert numpy types, tuples and paths to JSON primitives; non-finite floats
    become ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating | float):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _atomic_text(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, payload: Mapping) -> Path:
    """Write ``payload`` as indented strict JSON (``allow_nan=False``)."""
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False)
    return _atomic_text(Path(path), text + "\n")


def write_distances_json(path: str | Path, result: Mapping) -> Path:
    """Write the comparison result (``compare_embeddings`` output plus run context) as
    ``distances.json``."""
    return write_json(path, result)


def write_matrix_csv(path: str | Path, names: Sequence[str], matrix: np.ndarray) -> Path:
    """A square matrix as CSV with cohort names as header row and first column."""
    path = Path(path)
    m = np.asarray(matrix, dtype=np.float64)
    rows = [["cohort", *names]]
    rows += [[names[i], *(repr(float(v)) for v in m[i])] for i in range(len(names))]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)
    return path


def write_table_csv(
    path: str | Path, header: Sequence[str], rows: Sequence[Sequence[object]]
) -> Path:
    """A table as CSV (header row first), written under a temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        writer.writerows([list(map(str, r)) for r in rows])
    os.replace(tmp, path)
    return path


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a float32 NIfTI. A channel-first ``(C, X, Y, Z)`` array is stored as ``(X, Y, Z, C)``
    (NIfTI keeps extra dimensions last)."""
    path = Path(path)
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, 0, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp.{path.name}")
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else np.asarray(affine)), str(tmp))
    os.replace(tmp, path)
    return path
