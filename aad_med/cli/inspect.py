"""Stage 7, command line: ``aad-inspect COHORT [COHORT ...] [--json PATH]``.

Discovers and validates each cohort (folder or CSV manifest), prints a readable table per cohort
and optionally writes ``{"cohorts": [fingerprint, ...]}`` as JSON. Every cohort is checked
before anything is written, and the JSON is written to a temporary file renamed into place, so
an error never leaves a half-written file. Thin on purpose: the work is in
:mod:`aad_med.data.validation` and :mod:`aad_med.data.fingerprint`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from aad_med import CHANNELS, __version__
from aad_med.cli._errors import run_reporting_errors
from aad_med.data.fingerprint import cohort_fingerprint
from aad_med.data.validation import SkippedSubjectsWarning, load_cohort
from aad_med.errors import AADError, CohortError, InputError
from aad_med.io_utils import write_json_atomic

PROG = "aad-inspect"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Check BraTS-style cohorts (folders in the BraTS 2020/2021/2023 or Decathlon layout, "
            "or CSV manifests subject_id,t1,t1ce,t2,flair[,seg]) and print their fingerprints."
        ),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("cohorts", nargs="+", metavar="COHORT", help="cohort folder or CSV manifest")
    p.add_argument("--json", metavar="PATH", help='write {"cohorts": [fingerprint, ...]} here')
    p.add_argument(
        "--force",
        action="store_true",
        help="let --json replace an existing file that aad-inspect did not write",
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="leave out subjects with problems (listed as warnings) instead of failing",
    )
    p.add_argument(
        "--max-subjects",
        type=int,
        metavar="N",
        help="read voxels of at most N subjects per cohort for intensity statistics",
    )
    p.add_argument(
        "--headers-only",
        action="store_true",
        help="validate headers and grids only (skip NaN/Inf/empty/label checks; faster)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks and progress logs")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aad-inspect``; returns the exit code (0 ok, 2 invalid input)."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return run_reporting_errors(PROG, lambda: _run(args), verbose=args.verbose or None)


def _run(args: argparse.Namespace) -> int:
    if args.max_subjects is not None and args.max_subjects < 1:
        raise InputError("--max-subjects", f"must be at least 1, got {args.max_subjects}")
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        check_json_target(json_path, args.cohorts, args.force)

    cohorts, problems = [], []
    for path in args.cohorts:
        try:
            with warnings.catch_warnings():
                # The skipped subjects are printed below, one line each.
                warnings.simplefilter("ignore", SkippedSubjectsWarning)
                cohorts.append(
                    load_cohort(
                        path, skip_invalid=args.skip_invalid, check_voxels=not args.headers_only
                    )
                )
        except CohortError as e:
            problems.extend(e.problems)
        except AADError as e:
            problems.append(str(e))
    if problems:
        raise CohortError(problems)

    fingerprints = []
    for cohort in cohorts:
        if cohort.skipped:
            n = len(cohort.skipped)
            print(
                f"{PROG}: warning: {cohort.path}: skipped {n} of {n + len(cohort.subjects)} "
                "subjects with problems:",
                file=sys.stderr,
            )
            for line in cohort.skipped:
                print(f"{PROG}: warning:   {line}", file=sys.stderr)
        # --headers-only reads no voxel at all: no intensity statistics.
        fp = cohort_fingerprint(cohort, max_subjects=0 if args.headers_only else args.max_subjects)
        fingerprints.append(fp)
        print(format_table(fp))
        if not args.headers_only and fp["n_fingerprinted"]:
            print(quality_table(cohort, fp["fingerprinted_ids"]))
    if json_path is not None:
        write_json_atomic(json_path, {"written_by": PROG, "cohorts": fingerprints})
        print(f"fingerprint written to {json_path}")
    return 0


def written_by_us(path: Path) -> bool:
    """Whether ``path`` is a fingerprint JSON of aad-inspect (``"written_by": "aad-inspect"``)."""
    try:
        if path.stat().st_size > 64 << 20:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("written_by") == PROG


def check_json_target(path: Path, cohorts: list[str], force: bool) -> None:
    """Refuse a ``--json`` path that would clobber something: a folder, a path inside an input
    cohort or one of its files (always), an existing file aad-inspect did not write (unless
    ``--force``).

    Raises:
        InputError: names the path and what to do.
    """
    if path.is_dir():
        raise InputError(path, "is a folder; --json needs a file path")
    for cohort in map(Path, cohorts):
        if not cohort.exists():
            continue
        inside = cohort.is_dir() and path.resolve().is_relative_to(cohort.resolve())
        if inside or (path.exists() and path.resolve() == cohort.resolve()):
            raise InputError(
                path, f"is inside the input cohort {cohort}; --json never writes into a cohort"
            )
    if os.path.lexists(path) and not force and not written_by_us(path):
        raise InputError(
            path,
            "exists and was not written by aad-inspect; choose another --json path, or pass "
            "--force to replace it",
        )


QUALITY_SHOWN = ("snr_total", "cnr", "cjv", "efc", "inu_range", "wm2max")
"""IQMs printed per channel (medians over the subjects read; aad_med.data.quality defines them)."""


def quality_table(cohort, subject_ids: list[str]) -> str:
    """Median image-quality metrics per channel over the subjects whose voxels were read."""
    import numpy as np

    from aad_med.pipelines.subjects import subject_quality_table

    wanted = set(subject_ids)
    records = [r for r in cohort.subjects if r.subject_id in wanted]
    columns, values = subject_quality_table(records)
    lines = [
        f"  quality   median image-quality metrics over {len(records)} subjects "
        "(aad_med/data/quality.py)",
        f"  {'channel':<8}" + "".join(f"{m:>11}" for m in QUALITY_SHOWN),
    ]
    for ch in CHANNELS:
        row = []
        for m in QUALITY_SHOWN:
            v = values[:, columns.index(f"{ch}_{m}")]
            v = v[np.isfinite(v)]
            row.append(_num(float(np.median(v))) if v.size else f"{'n/a':>11}")
        lines.append(f"  {ch:<8}" + "".join(row))
    return "\n".join(lines)


def format_table(fp: dict) -> str:
    """A readable multi-line summary of one fingerprint."""
    lines = [f"cohort {fp['path']}  (layout {fp['layout']})"]
    ids = fp["subject_ids"]
    shown = ", ".join(ids[:3]) + (f", ... {ids[-1]}" if len(ids) > 3 else "")
    lines.append(
        f"  subjects  {fp['n_subjects']} ({fp['n_with_seg']} with seg, "
        f"{fp['n_skipped']} skipped): {shown}"
    )
    lines.append(f"  shape     {_range_text(fp['shapes'], 'x', '{:g}')}")
    lines.append(f"  spacing   {_range_text(fp['spacings'], ' x ', '{:.3g}')} mm")
    orient = ", ".join(f"{k} ({v})" for k, v in fp["orientations"].items())
    lines.append(f"  orient    {orient}")
    bv = fp["brain_volume_ml"]
    if bv["n"]:
        lines.append(
            f"  brain     {bv['mean']:.1f} ml mean (min {bv['min']:.1f}, max {bv['max']:.1f}) "
            f"over {fp['n_fingerprinted']} subjects read"
        )
        header = f"  {'channel':<8}{'mean':>11}{'std':>11}{'p0.5':>11}{'p50':>11}{'p99.5':>11}"
        lines.append(header)
        for ch in CHANNELS:
            st = fp["intensity"][ch]
            vals = [st[k] for k in ("mean", "std", "p00_5", "p50", "p99_5")]
            lines.append(f"  {ch:<8}" + "".join(_num(v) for v in vals))
    seg = fp["seg"]
    if seg["n_read"]:
        tf = seg["tumour_fraction"]
        lines.append(
            f"  tumour    {seg['n_with_tumour']}/{seg['n_read']} segs non-empty, "
            f"mean {100 * tf['mean']:.2f}% of brain; labels {', '.join(sorted(seg['label_voxels'], key=int))}"
        )
    return "\n".join(lines)


def _range_text(rows: list[list[float]], sep: str, fmt: str) -> str:
    if not rows:
        return "-"
    uniq = sorted({tuple(r) for r in rows})
    text = [sep.join(fmt.format(v) for v in r) for r in uniq]
    if len(uniq) == 1:
        return f"{text[0]} (all)"
    return f"{len(uniq)} distinct: {text[0]} ... {text[-1]}"


def _num(v: float | None) -> str:
    return f"{'-':>11}" if v is None else f"{v:>11.4g}"


if __name__ == "__main__":
    sys.exit(main())
