"""Stage 7, calibration: the calibration table as files (``calibration.csv`` text, reading a
``calibration.csv``/``calibration.json`` or an in-memory table). No statistics here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from aad_med.calibration.curves import CALIBRATION_COLUMNS
from aad_med.errors import ConfigError, InputError

log = logging.getLogger("aad_med.calibrate")


def read_calibration_table(source) -> list[dict]:
    """Calibration rows from ``calibration.csv``, a ``calibration.json`` (its ``rows``), a list of
    row dicts, or a mapping of columns.

    Raises:
        InputError: a file that cannot be read or lacks the columns.
        ConfigError: an in-memory table without the columns.
    """
    need = ("artefact", "severity", "n_per_cohort", "aad")
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(path, f"cannot read calibration ({e.strerror or e})") from None
        if path.suffix.lower() == ".json":
            try:
                rows = json.loads(text).get("rows")
            except (ValueError, AttributeError):
                rows = None
            if not isinstance(rows, list):
                raise InputError(path, "not a calibration.json (no 'rows' list)")
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            if not rows or any(c not in rows[0] for c in need):
                raise InputError(path, f"not a calibration table (needs columns {', '.join(need)})")
        return [_renamed_columns(r) for r in rows]
    if isinstance(source, Mapping):
        missing = [c for c in need if c not in source]
        if missing:
            raise ConfigError(f"calibration table lacks column(s) {', '.join(missing)}")
        cols = {k: list(v) for k, v in source.items()}
        n = len(cols["aad"])
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    rows = [dict(r) for r in source]
    if rows and any(c not in rows[0] for c in need):
        raise ConfigError(f"calibration rows lack column(s) among {', '.join(need)}")
    return rows


# Tables written before the rename called the Mahalanobis distance of the means
# ``aad_standardized``, a name ``aad-compare`` now gives to the bias-corrected distance.
_OLD_COLUMNS = {"aad_standardized": "aad_mahalanobis"}


def _renamed_columns(row: dict) -> dict:
    """A row read from a file, with columns written under an older name renamed."""
    return {_OLD_COLUMNS.get(k, k): v for k, v in row.items()}


def calibration_csv_text(rows: Iterable[Mapping]) -> str:
    """``calibration.csv`` content: :data:`CALIBRATION_COLUMNS`, floats in full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CALIBRATION_COLUMNS)
    for r in rows:
        writer.writerow([_cell(r[c]) for c in CALIBRATION_COLUMNS])
    return buf.getvalue()


def _cell(value) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)
