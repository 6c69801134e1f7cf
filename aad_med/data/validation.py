"""Stage 1, data: cohort validation. Checks every file of a discovered cohort before any
training or embedding touches it, and reports every problem of the cohort at once, one line
``file: problem`` each.

Order per subject: headers first (readable NIfTI, header extensions, dimensionality, size limit,
affine; each header read once), then the per-subject budget on the voxels all its files decode to
(:func:`aad_med.data.io.check_subject_budget`), then one grid for all modalities (shape and affine
within tolerance), then voxels (NaN/Inf, all-zero, segmentation labels). Voxels are read one file
at a time, so memory stays flat whatever the cohort size, and never for a subject over budget.
A subject that passed before (a marker in ``checked_dir``, keyed by its files' content and the
limits) is not read again. File reading itself lives in :mod:`aad_med.data.io`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from aad_med import CHANNELS
from aad_med.data.io import (
    AFFINE_TOLERANCE,
    MAX_VOXELS,
    check_affine,
    check_dimensions,
    check_seg_labels,
    check_subject_budget,
    check_values,
    extension_byte_limit,
    read_header,
    read_stored,
    subject_voxel_budget,
)
from aad_med.data.layouts import discover_cohort
from aad_med.data.records import Cohort, ImageSource, SubjectRecord
from aad_med.errors import CohortError, InputError
from aad_med.io_utils import DigestMemo, cache_key, file_stats

log = logging.getLogger(__name__)


CHECKS_VERSION = 2
"""Bumped whenever validation's checks change: markers of subjects that passed other checks
are then not found (``checked_dir`` of :func:`validate_cohort`)."""


class SkippedSubjectsWarning(UserWarning):
    """Some subjects of a cohort were left out by ``skip_invalid`` (listed in ``Cohort.skipped``)."""


@dataclass
class _Header:
    shape: tuple[int, int, int]
    affine: np.ndarray
    img: nib.Nifti1Image


def validate_cohort(
    cohort: Cohort,
    skip_invalid: bool = False,
    max_voxels: int = MAX_VOXELS,
    check_voxels: bool = True,
    affine_tolerance: float = AFFINE_TOLERANCE,
    max_subject_voxels: int | None = None,
    checked_dir: str | Path | None = None,
    record_checked: bool = True,
    digests_dir: str | Path | None = None,
) -> Cohort:
    """Check every file of every subject and report all problems at once.

    Args:
        cohort: a discovered cohort (:func:`aad_med.data.layouts.discover_cohort`).
        skip_invalid: drop subjects with problems instead of raising; they are listed in the
            returned ``Cohort.skipped`` (one line per subject) and a
            :class:`SkippedSubjectsWarning` gives the count.
        max_voxels: refuse headers claiming more voxels than this, before reading.
        check_voxels: also read voxels (NaN/Inf, all-zero, segmentation labels); ``False``
            checks headers and grids only, which is much faster on large cohorts.
        affine_tolerance: largest difference allowed between the affines of one subject's files.
        max_subject_voxels: per-subject budget on decoded voxels across all its files;
            ``None`` uses ``$AAD_MAX_SUBJECT_VOXELS`` or
            :data:`aad_med.data.io.MAX_SUBJECT_VOXELS`.
        checked_dir: a folder remembering subjects that passed: an empty marker file per
            subject (``headers-ok-KEY``, and ``voxels-ok-KEY`` once its voxels passed too),
            KEY covering its record, its files' path, size, modification time and content
            digest (:func:`aad_med.io_utils.file_stats`), the limits (voxels, affine tolerance,
            subject budget, header extensions) and :data:`CHECKS_VERSION`. A subject with the
            marker of what is asked is not read again at all; an edited file, other limits or
            other checks mean other keys, so it is checked again.
        record_checked: add markers for subjects that pass (``False``: a read-only folder).
        digests_dir: where the markers' file digests are remembered across runs
            (:class:`aad_med.io_utils.DigestMemo`, written with ``record_checked``), so a
            second validation does not hash every file again; ``None``: hashed each run.

    Returns:
        A new cohort holding the valid subjects (the input is not modified).

    Raises:
        CohortError: one line per problem (``file: problem``) when any subject is invalid and
            ``skip_invalid`` is false, or when no valid subject is left.
    """
    good: list[SubjectRecord] = []
    problems: list[str] = []
    skipped = list(cohort.skipped)
    memo = None
    if digests_dir is not None and checked_dir is not None:
        memo = DigestMemo(digests_dir, write=record_checked)
    limits = {
        "v": CHECKS_VERSION,
        "max_voxels": int(max_voxels),
        "affine_tolerance": float(affine_tolerance),
        "subject_budget": subject_voxel_budget(max_subject_voxels),
        "extension_bytes": extension_byte_limit(),
    }
    for i, subject in enumerate(cohort.subjects, start=1):
        marker = _checked_marker(subject, checked_dir, limits, memo)
        if marker is not None and (
            marker("voxels").is_file() or (not check_voxels and marker("headers").is_file())
        ):
            # Passed these checks before, file content unchanged: read nothing again (decoding
            # every volume costs as much as embedding it; headers cost ~3 ms per subject).
            good.append(subject)
            continue
        lines = subject_problems(
            subject, max_voxels, check_voxels, affine_tolerance, max_subject_voxels
        )
        if not lines and marker is not None and record_checked:
            with contextlib.suppress(OSError):
                marker("headers").parent.mkdir(parents=True, exist_ok=True)
                marker("headers").touch()
                if check_voxels:
                    marker("voxels").touch()
        if not lines:
            good.append(subject)
        elif skip_invalid:
            skipped.append("; ".join(lines))
        else:
            problems.extend(lines)
        if i % 50 == 0:
            log.info("%s: validated %d/%d subjects", cohort.path, i, len(cohort.subjects))
    if problems:
        raise CohortError(problems)
    if not good:
        raise CohortError([*skipped, f"{cohort.path}: no valid subject left after skipping"])
    if skipped:
        n_total = len(good) + len(skipped)
        msg = (
            f"{cohort.path}: skipped {len(skipped)} of {n_total} subjects with problems "
            "(listed in Cohort.skipped)"
        )
        # warnings only (not also log.warning): one message, not two, where logging is unset.
        log.info(msg)
        warnings.warn(msg, SkippedSubjectsWarning, stacklevel=2)
    return Cohort(path=cohort.path, layout=cohort.layout, subjects=good, skipped=skipped)


def _checked_marker(
    subject: SubjectRecord,
    checked_dir: str | Path | None,
    limits: dict,
    memo: DigestMemo | None = None,
):
    """``what -> marker path`` (``"headers"``, ``"voxels"``) of a subject, or ``None``."""
    if checked_dir is None:
        return None
    files = file_stats(subject.files, memo)
    key = cache_key({"record": subject.as_dict(), "files": files, "limits": limits})
    return lambda what: Path(checked_dir) / f"{what}-ok-{key}"


def load_cohort(
    path: str | Path,
    skip_invalid: bool = False,
    check_voxels: bool = True,
    max_voxels: int = MAX_VOXELS,
    max_subject_voxels: int | None = None,
    checked_dir: str | Path | None = None,
    record_checked: bool = True,
    digests_dir: str | Path | None = None,
) -> Cohort:
    """Discover a cohort folder or CSV manifest and validate it (see :func:`validate_cohort`).

    Raises:
        CohortError: every problem of the cohort, one line each.
    """
    cohort = discover_cohort(path, skip_invalid=skip_invalid)
    return validate_cohort(
        cohort,
        skip_invalid=skip_invalid,
        max_voxels=max_voxels,
        check_voxels=check_voxels,
        max_subject_voxels=max_subject_voxels,
        checked_dir=checked_dir,
        record_checked=record_checked,
        digests_dir=digests_dir,
    )


def subject_problems(
    subject: SubjectRecord,
    max_voxels: int = MAX_VOXELS,
    check_voxels: bool = True,
    affine_tolerance: float = AFFINE_TOLERANCE,
    max_subject_voxels: int | None = None,
) -> list[str]:
    """All problems of one subject, one line ``file: problem`` each (empty when valid)."""
    problems: list[str] = []
    sources: list[tuple[str, ImageSource]] = [(ch, subject.images[ch]) for ch in CHANNELS]
    if subject.seg is not None:
        sources.append(("seg", subject.seg))
    headers: dict[str, _Header] = {}
    for name, src in sources:
        try:
            img = read_header(src.path, max_voxels)
            shape = check_dimensions(img, src)
            headers[name] = _Header(shape, check_affine(img, src.path), img)
        except InputError as e:
            # A 4D file stands for four channels: report its header problem once.
            if str(e) not in problems:
                problems.append(str(e))
    if not problems:
        try:
            budgeted = [(src, headers[n].img, headers[n].affine) for n, src in sources]
            check_subject_budget(subject.subject_id, budgeted, max_subject_voxels)
        except InputError as e:
            # Over budget: reading its voxels is exactly what must not happen.
            return [str(e)]
    problems.extend(_grid_problems(sources, headers, affine_tolerance))
    if check_voxels:
        problems.extend(_voxel_problems(sources, headers))
    return problems


def _grid_problems(
    sources: list[tuple[str, ImageSource]], headers: dict[str, _Header], tol: float
) -> list[str]:
    ref = next(((n, s) for n, s in sources if n in headers), None)
    if ref is None:
        return []
    ref_name, ref_src = ref
    ref_h = headers[ref_name]
    out = []
    for name, src in sources:
        h = headers.get(name)
        if h is None or name == ref_name:
            continue
        if h.shape != ref_h.shape:
            out.append(
                f"{src.path}: {name} shape {h.shape} differs from {ref_name} shape {ref_h.shape} "
                f"({ref_src.path.name})"
            )
            continue
        diff = float(np.max(np.abs(h.affine - ref_h.affine)))
        if diff > tol:
            out.append(
                f"{src.path}: {name} affine differs from {ref_name} ({ref_src.path.name}) by "
                f"{diff:.3g} mm (tolerance {tol:g})"
            )
    return out


def _voxel_problems(
    sources: list[tuple[str, ImageSource]], headers: dict[str, _Header]
) -> list[str]:
    out: list[str] = []
    four_d: dict[Path, np.ndarray | None] = {}
    checked: set[tuple[Path, bool]] = set()
    for name, src in sources:
        if name not in headers:
            continue
        if src.volume is None:
            # A manifest may list one file for several channels: read and check it once.
            key = (src.path, name == "seg")
            if key in checked:
                continue
            checked.add(key)
        try:
            img = headers[name].img
            if src.volume is None:
                data = read_stored(img, src.path, None)
                where: str | Path = src.path
            else:
                # Decompress a 4D file once for its four channels.
                if src.path not in four_d:
                    four_d[src.path] = None
                    four_d[src.path] = read_stored(img, src.path, -1)
                full = four_d[src.path]
                if full is None:
                    continue
                data = full[..., src.volume]
                where = f"{src.path} (volume {src.volume}, {name})"
            if name == "seg":
                check_values(data, src.path, allow_empty=True)
                check_seg_labels(data, src.path)
            else:
                check_values(data, where)
                if data.dtype.kind == "f" and data.dtype.itemsize > 4:
                    # The loader keeps float32: float64 voxels beyond its range become Inf and
                    # tiny ones 0 (load_subject checks the cast too; found by the fuzz test).
                    with np.errstate(over="ignore", under="ignore"):
                        check_values(data.astype(np.float32), where)
        except InputError as e:
            if str(e) not in out:
                out.append(str(e))
    return out
