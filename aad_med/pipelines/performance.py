"""The user's own model's scores for ``aad-transfer performance=PATH``: a CSV
``cohort,subject_id,score`` (e.g. the per-subject Dice of their nnU-Net), read and checked
against the cohorts. Reads that one file; computes nothing."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path

from aad_med.data.records import Cohort
from aad_med.errors import InputError


def read_performance(path: str | Path) -> dict[str, dict[str, float]]:
    """Per-subject scores of the user's model: CSV with header ``cohort,subject_id,score``.

    Returns:
        ``{cohort: {subject_id: score}}`` in file order.

    Raises:
        InputError: missing file, wrong header, a non-numeric or non-finite score, a repeated
            (cohort, subject_id), or no rows — naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "performance file does not exist")
    out: dict[str, dict[str, float]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if header[:3] != ["cohort", "subject_id", "score"]:
                raise InputError(path, f"header must be cohort,subject_id,score, got {header}")
            for line, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < 3:
                    raise InputError(path, f"line {line}: expected 3 columns, got {len(row)}")
                cohort, sid, raw = row[0].strip(), row[1].strip(), row[2].strip()
                try:
                    score = float(raw)
                except ValueError:
                    raise InputError(path, f"line {line}: score {raw!r} is not a number") from None
                if not math.isfinite(score):
                    raise InputError(path, f"line {line}: score {raw!r} is not finite")
                if sid in out.setdefault(cohort, {}):
                    raise InputError(path, f"line {line}: {cohort}/{sid} appears twice")
                out[cohort][sid] = score
    except UnicodeDecodeError:
        raise InputError(path, "not a UTF-8 text CSV") from None
    if not out:
        raise InputError(path, "no scores (expected rows cohort,subject_id,score)")
    return out


def scores_for(
    perf: Mapping[str, Mapping[str, float]], name: str, cohort: Cohort, path: str | Path
) -> dict[str, float]:
    """The scores of cohort ``name`` from a :func:`read_performance` table.

    Raises:
        InputError: the file has no rows for ``name``, or names subjects the cohort lacks.
    """
    if name not in perf:
        raise InputError(path, f"no scores for cohort {name!r} (cohorts in the file: {list(perf)})")
    unknown = sorted(set(perf[name]) - set(cohort.subject_ids))
    if unknown:
        shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise InputError(path, f"cohort {name!r}: subject(s) {shown} are not in {cohort.path}")
    return dict(perf[name])
