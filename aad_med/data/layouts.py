"""Stage 1, data: cohort discovery. Turns a folder (or a CSV manifest) into a
:class:`~aad_med.data.records.Cohort` by recognising one of the known layouts.

Layouts (:data:`LAYOUTS`):

- ``brats2021``: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``
- ``brats2020``: ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii``
  (uncompressed; validation subjects have no seg; a misnamed seg such as
  ``W39_1998.09.19_Segm.nii`` is accepted when it is the only file named like a seg)
- ``brats2023``: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``
  (t1n->t1, t1c->t1ce, t2w->t2, t2f->flair; also MEN, MET, PED, SSA)
- ``msd``: Medical Segmentation Decathlon Task01: ``imagesTr/BRATS_001.nii.gz`` 4D in the order
  of ``dataset.json`` (FLAIR, T1w, T1gd, T2w when absent), optional ``labelsTr/``; the
  nnU-Net v2 variant with one 3D file per channel (``BRATS_001_0000.nii.gz``) is also read.
  ``imagesTs/`` (unlabelled test cases) is not part of the cohort.
- ``csv``: a manifest ``subject_id,t1,t1ce,t2,flair[,seg]`` with paths relative to the CSV.

Files are matched by name patterns only: no voxel is read here (that is
:mod:`aad_med.data.validation`). Every problem becomes one line of a
:class:`~aad_med.errors.CohortError`, all problems of a cohort at once.

Size: all five layouts and their shared file matching live here, so that a cohort matching no
layout gets one message listing every layout tried and why it failed.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aad_med import CHANNELS
from aad_med.data.io import file_problem, is_nifti_path
from aad_med.data.records import Cohort, ImageSource, SubjectRecord
from aad_med.errors import CohortError

LAYOUTS: tuple[str, ...] = ("brats2021", "brats2020", "brats2023", "msd", "csv")
"""Names of the layouts :func:`discover_cohort` recognises, in the order they are tried."""

CSV_COLUMNS: tuple[str, ...] = ("subject_id", *CHANNELS)
"""Required columns of a CSV manifest (``seg`` is optional)."""

MSD_DEFAULT_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Channel order of Decathlon Task01_BrainTumour 4D images (FLAIR, T1w, T1gd, T2w)."""

_NII = r"\.nii(?:\.gz)?$"
# BraTS 2020/2021 suffixes; "t1ce" is tried before "t1" by the regex alternation order.
_BRATS21_RE = re.compile(r"^(?P<prefix>.*?)[_-](?P<tag>t1ce|t1|t2|flair|seg)" + _NII, re.I)
_BRATS23_RE = re.compile(r"^(?P<prefix>.*?)[_-](?P<tag>t1n|t1c|t2w|t2f|seg)" + _NII, re.I)
_BRATS23_TAGS = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}
_BRATS20_NAME = re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$", re.I)
_BRATS21_NAME = re.compile(r"^BraTS(2021)?_\d+$", re.I)
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<idx>\d{4})" + _NII, re.I)

# Modality names found in dataset.json files, normalised (lowercase, alphanumerics only).
_MODALITY_ALIASES: dict[str, str] = {
    **dict.fromkeys(["t1", "t1w", "t1n", "t1native", "t1weighted", "t1pre", "t1precontrast"], "t1"),
    **dict.fromkeys(
        [
            "t1ce",
            "t1c",
            "t1gd",
            "t1wgd",
            "t1gad",
            "t1wce",
            "t1post",
            "t1postcontrast",
            "t1contrast",
            "t1cegd",
        ],
        "t1ce",
    ),
    **dict.fromkeys(["t2", "t2w", "t2weighted"], "t2"),
    **dict.fromkeys(["flair", "t2flair", "t2f", "t2wflair"], "flair"),
}


@dataclass
class _Found:
    """What one layout detector saw in a folder."""

    layout: str
    subjects: list[SubjectRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Problems that make one subject unusable (skippable), keyed by subject ID.
    subject_problems: dict[str, list[str]] = field(default_factory=dict)


def discover_cohort(path: str | Path, skip_invalid: bool = False) -> Cohort:
    """Find the subjects of a cohort folder or CSV manifest, auto-detecting the layout.

    Args:
        path: a cohort folder (BraTS 2020/2021/2023 subject folders, or a Decathlon task folder
            with ``imagesTr/``) or a CSV manifest (or a folder holding exactly one manifest).
        skip_invalid: leave out subjects with a missing or ambiguous modality and list them in
            ``Cohort.skipped`` instead of raising. Problems of the whole cohort (unknown or
            mixed layout, duplicate IDs, empty cohort) always raise.

    Returns:
        The cohort with subjects sorted by ID; no file has been opened.

    Raises:
        CohortError: one line per problem, each naming the folder or file.
    """
    path = Path(path)
    if not path.exists():
        raise CohortError([f"{path}: cohort folder or CSV manifest does not exist"])
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _finish(path, _read_csv(path), skip_invalid)
        what = "a single NIfTI file" if is_nifti_path(path) else "a file"
        raise CohortError([f"{path}: is {what}; expected a cohort folder or a CSV manifest"])
    try:
        entries = _listdir(path)
    except OSError as e:
        raise CohortError([f"{path}: cannot list folder ({e.strerror or e})"]) from None
    if not entries:
        raise CohortError([f"{path}: empty cohort (the folder is empty)"])
    try:
        return _discover_folder(path, entries, skip_invalid)
    except _NoLayoutError:
        # Kaggle nests releases (BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/...):
        # follow a chain of single sub-folders, but report the folder the user gave.
        inner = _single_subfolder_chain(entries)
        if inner is not None:
            try:
                return _discover_folder(inner, _listdir(inner), skip_invalid)
            except (_NoLayoutError, OSError):
                pass
        raise


class _NoLayoutError(CohortError):
    """No layout matched a folder at all (as opposed to a matched layout with problems)."""


def _discover_folder(root: Path, entries: list[Path], skip_invalid: bool) -> Cohort:
    found = _scan_brats(root, entries)
    msd = _scan_msd(root)
    if msd is not None:
        found.append(msd)
    matched = [f for f in found if f.subjects or f.subject_problems]
    if len(matched) > 1:
        raise CohortError([_mixed_message(root, matched)])
    if matched:
        return _finish(root, matched[0], skip_invalid)
    problems = [p for f in found for p in f.problems]
    if problems:
        raise CohortError(problems)
    manifests = [e for e in entries if e.is_file() and e.suffix.lower() == ".csv"]
    if len(manifests) == 1 and _looks_like_manifest(manifests[0]):
        return _finish(manifests[0], _read_csv(manifests[0]), skip_invalid)
    raise _NoLayoutError([_unknown_layout_message(root, entries, manifests)])


def _listdir(folder: Path) -> list[Path]:
    # Hidden entries (".DS_Store", macOS "._BRATS_001.nii.gz" forks in the Decathlon tarball)
    # and "__MACOSX" are archive debris, never data.
    return sorted(
        e for e in folder.iterdir() if not e.name.startswith(".") and e.name != "__MACOSX"
    )


def _single_subfolder_chain(entries: list[Path], depth: int = 3) -> Path | None:
    """The innermost folder of a chain of lone sub-folders holding no NIfTI or CSV file."""
    inner = None
    for _ in range(depth):
        dirs = [e for e in entries if e.is_dir()]
        data_files = [e for e in entries if is_nifti_path(e) or e.suffix.lower() == ".csv"]
        if len(dirs) != 1 or data_files or _has_nifti(dirs[0]):
            break
        try:
            entries = _listdir(dirs[0])
        except OSError:
            break
        inner = dirs[0]
    return inner


def _has_nifti(folder: Path) -> bool:
    try:
        return any(is_nifti_path(e) for e in folder.iterdir())
    except OSError:
        return False


def _finish(path: Path, found: _Found, skip_invalid: bool) -> Cohort:
    """Apply cohort-level checks (duplicates, emptiness) and the skip policy."""
    problems = list(found.problems)
    subjects = list(found.subjects)
    skipped: list[str] = []
    for sid in sorted(found.subject_problems):
        lines = found.subject_problems[sid]
        if skip_invalid:
            # One line per skipped subject, so len(skipped) counts subjects.
            skipped.append("; ".join(lines))
        else:
            problems.extend(lines)
    counts = Counter(s.subject_id for s in subjects)
    counts.update(sid for sid in found.subject_problems)
    for sid, n in sorted(counts.items()):
        if n > 1:
            problems.append(f"{path}: duplicate subject ID {sid!r} ({n} entries)")
    if problems:
        raise CohortError(problems)
    if not subjects:
        if skipped:
            raise CohortError([*skipped, f"{path}: no valid subject left after skipping"])
        raise CohortError([f"{path}: empty cohort (no subject found, layout {found.layout})"])
    subjects.sort(key=lambda s: s.subject_id)
    return Cohort(path=path, layout=found.layout, subjects=subjects, skipped=skipped)


def _copied_subjects(found: _Found) -> None:
    """Two subject folders holding files of the same subject (a copied folder) are duplicates."""
    first: dict[str, SubjectRecord] = {}
    for s in sorted(found.subjects, key=lambda r: r.subject_id):
        prefixes = {_file_prefix(src.path.name) for src in s.images.values()}
        if len(prefixes) != 1 or not (prefix := prefixes.pop()):
            continue
        if prefix in first:
            found.problems.append(
                f"{s.images['t1'].path.parent}: duplicate subject ID {prefix!r}: "
                f"its files are also in {first[prefix].images['t1'].path.parent}"
            )
        else:
            first[prefix] = s


def _file_prefix(name: str) -> str:
    for rx in (_BRATS21_RE, _BRATS23_RE):
        m = rx.match(name)
        if m:
            return m.group("prefix")
    return ""


# --------------------------------------------------------------------------- BraTS folders


def _scan_brats(root: Path, entries: list[Path]) -> list[_Found]:
    """One :class:`_Found` per BraTS release seen among the subject folders of ``root``."""
    by_layout: dict[str, _Found] = {}
    misc_problems: list[str] = []
    unmatched: list[Path] = []
    for folder in (e for e in entries if e.is_dir()):
        if folder.name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            continue
        try:
            named = [f for f in _listdir(folder) if is_nifti_path(f)]
        except OSError as e:
            misc_problems.append(f"{folder}: cannot list subject folder ({e.strerror or e})")
            continue
        # Links that loop or dangle, and devices, are named as such, not as missing modalities.
        unusable = {
            f: why for f in named if (why := file_problem(f)) and not why.startswith("is a folder")
        }
        files = [f for f in named if f in unusable or f.is_file()]
        if not files:
            continue
        layout, channels, problems = _match_subject_files(folder, files)
        if layout is None:
            unmatched.append(folder)
            continue
        for key, src in list(channels.items()):
            if src.path in unusable:
                problems.append(f"{src.path}: {unusable[src.path]}")
                del channels[key]
        found = by_layout.setdefault(layout, _Found(layout))
        if problems:
            found.subject_problems[folder.name] = problems
        else:
            seg = channels.pop("seg", None)
            found.subjects.append(SubjectRecord(folder.name, channels, seg))
    out = list(by_layout.values())
    for found in out:
        _copied_subjects(found)
    if out:
        # Folders of NIfTI files that follow no pattern are subjects we cannot read: say so
        # rather than silently leaving them out.
        for folder in unmatched:
            out[0].subject_problems[folder.name] = [
                f"{folder}: no file named like a BraTS modality "
                "(expected e.g. <id>_t1.nii.gz or <id>-t1n.nii.gz)"
            ]
        out[0].problems.extend(misc_problems)
    elif misc_problems:
        out.append(_Found("brats2021", problems=misc_problems))
    return out


def _match_subject_files(
    folder: Path, files: list[Path]
) -> tuple[str | None, dict[str, ImageSource], list[str]]:
    """Assign the NIfTI files of one subject folder to channels.

    Returns:
        ``(layout, {channel|"seg": source}, problems)``; layout ``None`` when no file looks like a
        BraTS modality.
    """
    hits21 = [(f, m.group("tag").lower()) for f in files if (m := _BRATS21_RE.match(f.name))]
    hits23 = [
        (f, _BRATS23_TAGS[m.group("tag").lower()])
        for f in files
        if (m := _BRATS23_RE.match(f.name))
    ]
    n21 = sum(t != "seg" for _, t in hits21)
    n23 = sum(t != "seg" for _, t in hits23)
    if n21 == 0 and n23 == 0:
        return None, {}, []
    if n23 > n21:
        layout, hits = "brats2023", hits23
    else:
        hits = hits21
        if _BRATS20_NAME.match(folder.name):
            layout = "brats2020"
        elif _BRATS21_NAME.match(folder.name):
            layout = "brats2021"
        else:
            gz = any(f.name.lower().endswith(".gz") for f, t in hits if t != "seg")
            layout = "brats2021" if gz else "brats2020"
    by_tag: dict[str, list[Path]] = defaultdict(list)
    for f, tag in hits:
        by_tag[tag].append(f)
    problems: list[str] = []
    channels: dict[str, ImageSource] = {}
    suffix = {"brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}}.get(
        layout, {}
    )
    for ch in CHANNELS:
        cands = by_tag.get(ch, [])
        if not cands:
            problems.append(
                f"{folder}: missing modality {ch} (no file named *_{suffix.get(ch, ch)}.nii[.gz])"
            )
        elif len(cands) > 1:
            problems.append(
                f"{folder}: ambiguous modality {ch}: {', '.join(sorted(c.name for c in cands))}"
            )
        else:
            channels[ch] = ImageSource(cands[0])
    segs = by_tag.get("seg", [])
    if not segs:
        # Real BraTS 2020 releases hold misnamed segs (e.g. W39_1998.09.19_Segm.nii in
        # BraTS20_Training_355): accept the one file whose name mentions "seg".
        used = {src.path for src in channels.values()}
        segs = [f for f in files if "seg" in f.name.lower() and f not in used]
    if len(segs) == 1:
        channels["seg"] = ImageSource(segs[0])
    elif len(segs) > 1:
        problems.append(
            f"{folder}: ambiguous segmentation: {', '.join(sorted(s.name for s in segs))}"
        )
    return layout, channels, problems


# --------------------------------------------------------------------------- Decathlon


def _scan_msd(root: Path) -> _Found | None:
    images = root / "imagesTr"
    if not images.is_dir():
        return None
    found = _Found("msd")
    order, problem = _msd_channel_order(root / "dataset.json")
    if problem:
        found.problems.append(problem)
        return found
    try:
        entries = _listdir(images)
    except OSError as e:
        found.problems.append(f"{images}: cannot list folder ({e.strerror or e})")
        return found
    for f in entries:
        why = file_problem(f) if is_nifti_path(f) else None
        if why and not why.startswith("is a folder"):
            found.problems.append(f"{f}: {why}")
    files = [f for f in entries if f.is_file()]
    nifti = [f for f in files if is_nifti_path(f)]
    labels = _msd_labels(root / "labelsTr", found)
    split = [f for f in nifti if _NNUNET_CHANNEL.match(f.name)]
    if nifti and len(split) == len(nifti):
        _msd_split_subjects(images, split, order, labels, found)
    else:
        for f in nifti:
            sid = _strip_nii(f.name)
            srcs = {ch: ImageSource(f, volume=i) for i, ch in enumerate(order)}
            found.subjects.append(SubjectRecord(sid, srcs, labels.pop(sid, None)))
    for sid, seg in sorted(labels.items()):
        if sid not in {s.subject_id for s in found.subjects} | set(found.subject_problems):
            found.problems.append(f"{seg.path}: segmentation without an image in {images}")
    if not found.subjects and not found.subject_problems and not found.problems:
        found.problems.append(f"{images}: empty cohort (no NIfTI image in imagesTr)")
    return found


def _msd_split_subjects(
    images: Path,
    files: list[Path],
    order: tuple[str, ...],
    labels: dict[str, ImageSource],
    found: _Found,
) -> None:
    """nnU-Net v2 style: one 3D file per channel, ``<case>_<NNNN>.nii.gz``."""
    cases: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for f in files:
        m = _NNUNET_CHANNEL.match(f.name)
        cases[m.group("case")][int(m.group("idx"))].append(f)
    for case, by_idx in sorted(cases.items()):
        problems, srcs = [], {}
        for i, ch in enumerate(order):
            cands = by_idx.get(i, [])
            if len(cands) == 1:
                srcs[ch] = ImageSource(cands[0])
            elif not cands:
                problems.append(
                    f"{images}: missing modality {ch} of {case} (no {case}_{i:04d}.nii.gz)"
                )
            else:
                problems.append(
                    f"{images}: ambiguous modality {ch} of {case}: "
                    + ", ".join(sorted(c.name for c in cands))
                )
        if problems:
            found.subject_problems[case] = problems
        else:
            found.subjects.append(SubjectRecord(case, srcs, labels.pop(case, None)))


def _msd_labels(folder: Path, found: _Found) -> dict[str, ImageSource]:
    if not folder.is_dir():
        return {}
    try:
        files = [f for f in _listdir(folder) if f.is_file() and is_nifti_path(f)]
    except OSError as e:
        found.problems.append(f"{folder}: cannot list folder ({e.strerror or e})")
        return {}
    out: dict[str, ImageSource] = {}
    for f in files:
        sid = _strip_nii(f.name)
        if sid in out:
            found.problems.append(f"{f}: second segmentation for {sid} (also {out[sid].path.name})")
        out[sid] = ImageSource(f)
    return out


def _msd_channel_order(dataset_json: Path) -> tuple[tuple[str, ...], str | None]:
    """Channel order of the Decathlon images from ``dataset.json`` ("modality" in MSD,
    "channel_names" in nnU-Net v2), or the Task01 default when the file is absent."""
    if not dataset_json.is_file():
        return MSD_DEFAULT_ORDER, None
    try:
        meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return MSD_DEFAULT_ORDER, f"{dataset_json}: not readable JSON ({_first_line(e)})"
    mapping = None
    if isinstance(meta, dict):
        mapping = meta.get("modality", meta.get("channel_names"))
    if mapping is None:
        return MSD_DEFAULT_ORDER, None
    if not isinstance(mapping, dict) or not mapping:
        return MSD_DEFAULT_ORDER, f"{dataset_json}: 'modality' must map indices to names"
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except (TypeError, ValueError):
        return MSD_DEFAULT_ORDER, f"{dataset_json}: 'modality' keys must be indices 0, 1, ..."
    names = [_MODALITY_ALIASES.get(re.sub(r"[^a-z0-9]", "", v.lower())) for _, v in items]
    if [i for i, _ in items] != list(range(len(items))) or sorted(n or "" for n in names) != sorted(
        CHANNELS
    ):
        listed = ", ".join(f"{i}: {v}" for i, v in items)
        return MSD_DEFAULT_ORDER, (
            f"{dataset_json}: modalities {{{listed}}} are not the four channels "
            "T1, T1ce (T1gd), T2 and FLAIR, each once"
        )
    return tuple(n for n in names if n), None


def _strip_nii(name: str) -> str:
    return re.sub(_NII, "", name, flags=re.I)


# --------------------------------------------------------------------------- CSV manifest


def _looks_like_manifest(csv_path: Path) -> bool:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return "subject_id" in {h.strip().lower() for h in header}


def _read_csv(csv_path: Path) -> _Found:
    found = _Found("csv")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        found.problems.append(f"{csv_path}: cannot read manifest ({e.strerror or e})")
        return found
    except (UnicodeDecodeError, csv.Error) as e:
        found.problems.append(f"{csv_path}: not a readable CSV manifest ({_first_line(e)})")
        return found
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        found.problems.append(f"{csv_path}: empty manifest (no header, no rows)")
        return found
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        found.problems.append(
            f"{csv_path}: manifest lacks column(s) {', '.join(missing)} "
            f"(needs {','.join(CSV_COLUMNS)}[,seg]; has {','.join(header) or 'none'})"
        )
        return found
    col = {name: header.index(name) for name in header}
    base = csv_path.parent
    for lineno, row in enumerate(rows[1:], start=2):
        cells = {name: (row[i].strip() if i < len(row) else "") for name, i in col.items()}
        sid = cells["subject_id"]
        where = f"{csv_path}: line {lineno}"
        if not sid:
            found.problems.append(f"{where}: empty subject_id")
            continue
        problems, srcs = [], {}
        for ch in (*CHANNELS, "seg"):
            cell = cells.get(ch, "")
            if not cell:
                if ch != "seg":
                    problems.append(f"{where} ({sid}): missing modality {ch} (empty cell)")
                continue
            p = Path(cell).expanduser()
            p = p if p.is_absolute() else base / p
            why = file_problem(p)
            if why:
                what = {
                    "file does not exist": "does not exist",
                    "is a folder, expected a NIfTI file": "is a folder",
                }.get(why, why)
                problems.append(f"{where} ({sid}): {ch} file {p} {what}")
            else:
                srcs[ch] = ImageSource(p)
        if problems:
            found.subject_problems.setdefault(sid, []).extend(problems)
        else:
            seg = srcs.pop("seg", None)
            found.subjects.append(SubjectRecord(sid, srcs, seg))
    return found


# --------------------------------------------------------------------------- messages


def _mixed_message(root: Path, matched: Iterable[_Found]) -> str:
    parts = []
    for f in matched:
        ids = sorted([s.subject_id for s in f.subjects] + list(f.subject_problems))
        n = len(ids)
        example = ids[0] if ids else ("imagesTr" if f.layout == "msd" else "")
        parts.append(f"{f.layout} ({n} subject{'s' if n != 1 else ''}, e.g. {example})")
    return (
        f"{root}: cohort mixes layouts {' and '.join(parts)}; "
        "put each layout in its own folder (or list the subjects in a CSV manifest)"
    )


def _unknown_layout_message(root: Path, entries: list[Path], manifests: list[Path]) -> str:
    n_dirs = sum(e.is_dir() for e in entries)
    n_nii = sum(e.is_file() and is_nifti_path(e) for e in entries)
    brats = (
        f"no subject folder holds *_t1/_t1ce/_t2/_flair NIfTI files ({n_dirs} sub-folders)"
        if n_dirs
        else "no subject sub-folders"
    )
    if n_nii:
        brats += f"; {n_nii} NIfTI files lie directly in the folder"
    if not manifests:
        csv_why = "no .csv manifest in the folder"
    elif len(manifests) > 1:
        csv_why = f"{len(manifests)} .csv files, expected one manifest"
    else:
        csv_why = f"{manifests[0].name} has no subject_id column"
    return (
        f"{root}: no known layout matched; tried {', '.join(LAYOUTS)}: "
        f"brats2021/brats2020: {brats}; brats2023: no *-t1n/-t1c/-t2w/-t2f files; "
        f"msd: no imagesTr/ folder; csv: {csv_why}"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__
