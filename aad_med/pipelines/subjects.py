"""The per-subject step of ``aad-compare``: which subjects are different.

Every subject of every cohort is scored against one reference cohort
(:mod:`aad_med.distances.atypicality`) on the comparison's feature vectors and on the intensity
fingerprint, with conformal p-values (reference subjects leave-one-out), BH q-values within each
cohort and the feature block / dimensions / channel that drive the score; the MRIQC-style
image-quality metrics (:mod:`aad_med.data.quality`) are added to the same rows. The result is
``subjects.csv`` (one row per subject of every cohort), a summary in ``distances.json`` for the
report, and the figures of :mod:`aad_med.plots.subjects`.

This module only orders those stages and shapes their output; it computes no statistic itself
and writes no prose (the reason in words is :func:`aad_med.report.text.subject_reason`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aad_med import CHANNELS
from aad_med.data.records import SubjectRecord
from aad_med.errors import ConfigError, InputError

log = logging.getLogger("aad_med.compare")

SUBJECT_COLUMNS = (
    "cohort",
    "subject_id",
    "role",
    "atypicality",
    "atypicality_p",
    "atypicality_q",
    "atypicality_p_tail",
    "atypicality_q_tail",
    "intensity_atypicality",
    "intensity_p",
    "intensity_q",
    "top_block",
    "top_block_share",
    "top_channel",
    "top_dims",
)
"""Columns of ``subjects.csv`` before the image-quality columns (``{channel}_{metric}``)."""

MIN_REFERENCE = 3
"""Fewest reference subjects the atypicality scores are computed with (leave-one-out needs 3)."""

N_LISTED = 8
"""Subjects listed in the report's "Which subjects are different" table."""

N_THUMBNAILS = 4
"""Of those, how many get a mid-slice thumbnail of each channel."""


@dataclass
class SubjectSettings:
    """Options of the per-subject step (the recommended defaults of ``BENCHMARKS.md``)."""

    reference_cohort: str | None = None
    method: str = "knn"
    k: int = 5
    tail: str | None = "lognormal"
    quality: bool = True


def final_blocks(feature_set, raw: Mapping[str, np.ndarray]) -> list[tuple[str, int]]:
    """Named column blocks of ``feature_set``'s final vectors: a combined set's parts (each
    finalised on its own, as the set does, to learn its final width), else one block named after
    the set.

    Args:
        feature_set: the comparison's :class:`~aad_med.embedding.features.FeatureSet`.
        raw: ``{cohort: (n, F)}`` raw vectors of every compared cohort.
    """
    parts = getattr(feature_set, "parts", None)
    names = list(raw)
    if parts is None:
        final = feature_set.finalize(raw)
        return [(feature_set.name, int(final[names[0]].shape[1]))]
    split = {k: feature_set.split(v) for k, v in raw.items()}
    blocks = []
    for i, part in enumerate(parts):
        per = part.finalize({k: split[k][i] for k in names})
        blocks.append((part.name, int(per[names[0]].shape[1])))
    return blocks


def subject_quality_table(
    records: Sequence[SubjectRecord],
) -> tuple[list[str], np.ndarray]:
    """IQMs of every subject (:func:`aad_med.data.quality.subject_quality`); a subject whose
    metrics are undefined (empty brain mask, too few T1 values) gets a NaN row, logged.

    Raises:
        InputError: a file cannot be read (named by the loader).
    """
    from aad_med.data.quality import METRICS, subject_quality

    columns = [f"{ch}_{m}" for ch in CHANNELS for m in METRICS]
    values = np.full((len(records), len(columns)), np.nan)
    for i, rec in enumerate(records):
        try:
            metrics, _ = subject_quality(rec)
        except ValueError as e:
            log.warning("subject %s: image-quality metrics undefined (%s)", rec.subject_id, e)
            continue
        values[i] = [metrics[c] for c in columns]
    return columns, values


def _tail_or_none(reference: np.ndarray, tests: Mapping, method: str, k: int, tail):
    from aad_med.distances.atypicality import atypicality

    try:
        return atypicality(reference, tests, method=method, k=k, tail=tail)
    except ValueError as e:
        if tail is None:
            raise
        # Duplicated reference subjects give a zero LOO score: no tail can be fitted.
        log.warning("atypicality tail not fitted (%s); tail p-values equal the rank ones", e)
        res = atypicality(reference, tests, method=method, k=k, tail=None)
        for part in [res["reference"], *res["tests"].values()]:
            part["p_tail"], part["q_tail"] = part["p"], part["q"]
        return res


def _per_cohort(res: Mapping, names: Sequence[str], reference: str) -> dict[str, Mapping]:
    return {n: res["reference"] if n == reference else res["tests"][n] for n in names}


def subject_rows(
    vectors: Mapping[str, np.ndarray],
    subject_ids: Mapping[str, Sequence[str]],
    reference: str,
    blocks: Sequence[tuple[str, int]],
    fingerprints: Mapping[str, np.ndarray] | None = None,
    quality: tuple[Sequence[str], Mapping[str, np.ndarray]] | None = None,
    settings: SubjectSettings | None = None,
) -> tuple[list[str], list[dict], dict]:
    """Per-subject atypicality of every cohort against ``reference``, as table rows.

    Args:
        vectors: ``{cohort: (n, D)}`` final (jointly standardised) feature vectors, in order.
        subject_ids: ``{cohort: ids}`` in the order of ``vectors``' rows.
        reference: the reference cohort (a key of ``vectors``).
        blocks: ``(name, width)`` column blocks of the vectors (drivers are named by them).
        fingerprints: ``{cohort: (n, 4 * P)}`` raw intensity fingerprints (standardised here
            jointly over all cohorts); ``None``: no intensity columns.
        quality: ``(columns, {cohort: (n, Q)})`` image-quality metrics; ``None``: none.
        settings: method, ``k`` (reduced to ``n_ref - 1`` for small references) and tail.

    Returns:
        ``(columns, rows, info)``: the CSV columns, one dict per subject (cohorts in order,
        subjects in cohort order) and ``{"method", "k", "tail", "n_reference"}``.

    Raises:
        ConfigError: ``reference`` is not a cohort, or it has fewer than 2 subjects.
    """
    from aad_med.distances.atypicality import block_contributions, top_drivers
    from aad_med.embedding.acquisition import standardize_jointly

    s = settings or SubjectSettings()
    names = list(vectors)
    if reference not in vectors:
        raise ConfigError(
            f"reference_cohort={reference!r} is not one of the compared cohorts {names}"
        )
    n_ref = len(vectors[reference])
    # Leave-one-out scores need at least 3 reference subjects; a smaller reference still gets
    # its rows (IQMs), with empty atypicality cells.
    scored = n_ref >= MIN_REFERENCE
    k = max(1, min(int(s.k), n_ref - 1))
    tests = {n: v for n, v in vectors.items() if n != reference}
    res = fp_res = None
    if scored:
        res = _per_cohort(
            _tail_or_none(vectors[reference], tests, s.method, k, s.tail), names, reference
        )
    block_names = [b for b, _ in blocks]
    dim_names = [f"{b}[{j}]" for b, w in blocks for j in range(w)]
    if fingerprints is not None and scored:
        fp = standardize_jointly({n: fingerprints[n] for n in names})
        fp_tests = {n: v for n, v in fp.items() if n != reference}
        fp_res = _per_cohort(
            _tail_or_none(fp[reference], fp_tests, s.method, k, None), names, reference
        )
        width = fp[reference].shape[1] // len(CHANNELS)
        channel_blocks = [(ch, width) for ch in CHANNELS]
    q_columns = list(quality[0]) if quality is not None else []
    rows: list[dict] = []
    for name in names:
        if res is not None:
            r = res[name]
            by_block = block_contributions(r["contributions"], blocks)
            block_matrix = np.stack([by_block[b] for b in block_names], axis=1)
            tops = top_drivers(r["contributions"], 3)
        if fp_res is not None:
            by_channel = block_contributions(fp_res[name]["contributions"], channel_blocks)
            channel_matrix = np.stack([by_channel[ch] for ch in CHANNELS], axis=1)
        for i, sid in enumerate(subject_ids[name]):
            row = {c: math.nan for c in SUBJECT_COLUMNS}
            row.update(
                cohort=name,
                subject_id=str(sid),
                role="reference" if name == reference else "test",
                top_block="",
                top_channel="",
                top_dims="",
            )
            if res is not None:
                score = float(r["score"][i])
                top = int(np.argmax(block_matrix[i]))
                row.update(
                    atypicality=score,
                    atypicality_p=float(r["p"][i]),
                    atypicality_q=float(r["q"][i]),
                    top_block=block_names[top],
                    top_block_share=float(block_matrix[i, top] / score) if score > 0 else math.nan,
                    top_dims=";".join(dim_names[j] for j in tops[i]),
                )
                if "p_tail" in r:
                    row.update(
                        atypicality_p_tail=float(r["p_tail"][i]),
                        atypicality_q_tail=float(r["q_tail"][i]),
                    )
            if fp_res is not None:
                f = fp_res[name]
                row.update(
                    intensity_atypicality=float(f["score"][i]),
                    intensity_p=float(f["p"][i]),
                    intensity_q=float(f["q"][i]),
                    top_channel=CHANNELS[int(np.argmax(channel_matrix[i]))],
                )
            if quality is not None:
                row.update(zip(q_columns, map(float, quality[1][name][i]), strict=True))
            rows.append(row)
    info = {"method": s.method, "k": k if s.method == "knn" else None, "tail": s.tail}
    info["n_reference"] = n_ref
    if not scored:
        info["note"] = (
            f"the reference cohort {reference!r} has {n_ref} subjects; per-subject atypicality "
            f"needs at least {MIN_REFERENCE} (leave-one-out), so its columns are empty"
        )
    return [*SUBJECT_COLUMNS, *q_columns], rows, info


def _cell(v: object) -> str:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else repr(v)
    return str(v)


def write_subjects_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping]) -> Path:
    """``subjects.csv``: one row per subject; undefined numbers are empty cells."""
    from aad_med.report.serialize import write_table_csv

    return write_table_csv(path, columns, [[_cell(r[c]) for c in columns] for r in rows])


def most_atypical(rows: Sequence[Mapping], n: int = N_LISTED) -> list[Mapping]:
    """The ``n`` most atypical subjects: smallest tail p-value (the rank p-value refined beyond
    the reference's largest score), ties broken by the larger score."""

    def key(r: Mapping) -> tuple[float, float]:
        p = r["atypicality_p_tail"]
        return (r["atypicality_p"] if not math.isfinite(p) else p, -r["atypicality"])

    return sorted((r for r in rows if math.isfinite(r["atypicality"])), key=key)[:n]


def quality_summary(
    columns: Sequence[str], values: Mapping[str, np.ndarray]
) -> dict[str, dict[str, list[float | None]]]:
    """Per cohort and IQM column: ``[median, 25th, 75th percentile]`` (``None`` where undefined)."""
    out: dict[str, dict] = {}
    for name, v in values.items():
        out[name] = {}
        for j, col in enumerate(columns):
            x = v[:, j][np.isfinite(v[:, j])]
            out[name][col] = (
                [float(np.median(x)), *map(float, np.percentile(x, [25, 75]))]
                if x.size
                else [None, None, None]
            )
    return out


def add_subjects(
    result: dict,
    tmp: Path,
    vectors: Mapping[str, np.ndarray],
    subject_ids: Mapping[str, Sequence[str]],
    blocks: Sequence[tuple[str, int]],
    records: Mapping[str, Sequence[SubjectRecord]],
    fingerprints: Mapping[str, np.ndarray] | None,
    settings: SubjectSettings,
    known_quality: Mapping[str, np.ndarray] | None = None,
    drift: bool = False,
) -> None:
    """Run the per-subject step into ``tmp`` (``subjects.csv``, ``plots/subjects_*.png``) and
    put its summary under ``result["subjects"]`` (and ``result["drift"]`` with ``drift``).

    Args:
        result: the comparison result (its ``pairs`` give the drift plot's AADs).
        tmp: the run's staging folder.
        vectors, subject_ids, blocks, fingerprints: as :func:`subject_rows`.
        records: ``{cohort: subject records}`` of the cohorts read from files (IQMs and
            thumbnails); a cohort missing here (a stored reference) uses ``known_quality``.
        settings: the step's options; ``reference_cohort`` ``None`` means the first cohort.
        known_quality: ``{cohort: (n, Q)}`` IQMs already computed (a stored reference, or the
            embedding's from the volumes it decoded); such a cohort's files are not read for them.
        drift: also plot the AAD of each later cohort against the reference, in order.

    Raises:
        ConfigError: an unknown reference cohort. InputError: an unreadable file.
    """
    from aad_med.plots.subjects import ThumbnailSheet, plot_drift, plot_quality

    names = list(vectors)
    reference = settings.reference_cohort or names[0]
    quality = None
    if settings.quality:
        q_values: dict[str, np.ndarray] = {}
        q_columns: list[str] | None = None
        for name in names:
            if name in records and name not in (known_quality or {}):
                q_columns, q_values[name] = subject_quality_table(records[name])
        if known_quality:
            for name, v in known_quality.items():
                q_values[name] = np.asarray(v, dtype=np.float64)
        if q_columns is None:
            q_columns = subject_quality_table([])[0]
        quality = (q_columns, {n: q_values[n] for n in names})
    columns, rows, info = subject_rows(
        vectors, subject_ids, reference, blocks, fingerprints, quality, settings
    )
    write_subjects_csv(tmp / "subjects.csv", columns, rows)
    plots = tmp / "plots"
    plots.mkdir(exist_ok=True)
    listed = most_atypical(rows)
    from aad_med.report.text import SUBJECT_DEFINITIONS, subject_reason

    top = []
    thumbs = 0
    with ThumbnailSheet() as sheet:  # one figure redrawn for every thumbnail
        for r in listed:
            entry = {
                c: r[c]
                for c in (
                    "cohort",
                    "subject_id",
                    "role",
                    "atypicality",
                    "atypicality_p",
                    "atypicality_q",
                    "atypicality_p_tail",
                    "atypicality_q_tail",
                    "intensity_p",
                    "top_block",
                    "top_block_share",
                    "top_channel",
                    "top_dims",
                )
            }
            entry["reason"] = subject_reason(r, reference)
            rec = _record(records, r["cohort"], r["subject_id"])
            if rec is not None and thumbs < N_THUMBNAILS:
                png = f"plots/subject_{_safe(r['cohort'])}_{_safe(r['subject_id'])}.png"
                try:
                    sheet.draw(rec, tmp / png, title=f"{r['cohort']} / {r['subject_id']}")
                    entry["thumbnail"] = png
                    thumbs += 1
                except (InputError, ValueError) as e:
                    log.warning("no thumbnail for %s: %s", r["subject_id"], e)
            top.append(entry)
    counts = {
        name: {
            "n": sum(r["cohort"] == name for r in rows),
            "n_p05": sum(r["cohort"] == name and r["atypicality_p"] <= 0.05 for r in rows),
            "n_q05": sum(r["cohort"] == name and r["atypicality_q_tail"] <= 0.05 for r in rows),
        }
        for name in names
    }
    summary: dict = {
        "file": "subjects.csv",
        "reference_cohort": reference,
        **info,
        "features": result.get("features"),
        "columns": columns,
        "counts": counts,
        "most_atypical": top,
        "definitions": dict(SUBJECT_DEFINITIONS),
    }
    if quality is not None:
        summary["quality"] = quality_summary(*quality)
        png = "plots/subjects_quality.png"
        plot_quality(quality[0], quality[1], tmp / png)
        summary["quality_png"] = png
    result["subjects"] = summary
    if drift:
        batches = [n for n in names if n != reference]
        by_pair = {(p["a"], p["b"]): p for p in result.get("pairs", [])}
        points = []
        for name in batches:
            p = by_pair.get((reference, name)) or by_pair.get((name, reference))
            if p is None:
                continue
            points.append(
                {
                    "batch": name,
                    "aad": p["aad"],
                    "aad_ci95": p["aad_ci95"],
                    "aad_p": p["aad_p"],
                    "n_p05": counts[name]["n_p05"],
                }
            )
        png = "plots/drift.png"
        plot_drift(points, reference, tmp / png)
        result["drift"] = {"reference": reference, "batches": points, "png": png}


def _record(records: Mapping[str, Sequence[SubjectRecord]], cohort: str, sid: str):
    for rec in records.get(cohort, ()):
        if rec.subject_id == sid:
            return rec
    return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in str(name))
