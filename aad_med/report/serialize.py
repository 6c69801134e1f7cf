"""Writing machine-readable results: JSON made of primitives only (numpy scalars and arrays
converted, NaN/Inf written as ``null``), NIfTI volumes, CSV tables. Every file is written under a
temporary name and renamed, so readers never see half a file."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med.io_utils import write_json_atomic, write_nifti_atomic, write_text_atomic


def write_json(path: str | Path, payload: Mapping) -> Path:
    """Write ``payload`` as indented strict JSON (``allow_nan=False``)."""
    return write_json_atomic(path, payload)


def write_distances_json(path: str | Path, result: Mapping) -> Path:
    """Write the comparison result (``compare_embeddings`` output plus run context) as
    ``distances.json``."""
    return write_json(path, result)


def write_matrix_csv(path: str | Path, names: Sequence[str], matrix: np.ndarray) -> Path:
    """A square matrix as CSV with cohort names as header row and first column."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = [["cohort", *names]]
    rows += [[names[i], *(repr(float(v)) for v in m[i])] for i in range(len(names))]
    return _write_csv(Path(path), rows)


def write_table_csv(
    path: str | Path, header: Sequence[str], rows: Sequence[Sequence[object]]
) -> Path:
    """A table as CSV (header row first), written under a temporary name and renamed."""
    return _write_csv(Path(path), [list(header), *([str(v) for v in r] for r in rows)])


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write a float32 NIfTI. A channel-first ``(C, X, Y, Z)`` array is stored as ``(X, Y, Z, C)``
    (NIfTI keeps extra dimensions last)."""
    path = Path(path)
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim == 4:
        arr = np.moveaxis(arr, 0, -1)
    return write_nifti_atomic(path, arr, np.eye(4) if affine is None else np.asarray(affine))


def _write_csv(path: Path, rows: Sequence[Sequence[object]]) -> Path:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return write_text_atomic(path, buf.getvalue())
