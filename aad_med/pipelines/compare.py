"""The body of ``aad-compare`` as one call (:func:`run_comparison`): load a checkpoint and
cohorts, embed (cached), compute the statistics, and write every output into a run folder.

The stages do the work: :mod:`aad_med.embedding` (vectors), :mod:`aad_med.distances` (numbers),
:mod:`aad_med.data.intensity` (the raw-image fingerprint), :mod:`aad_med.calibration`
(equivalent severities), :mod:`aad_med.pipelines.reference` (a stored reference,
``reference=REF``), :mod:`aad_med.plots.comparison` (figures) and :mod:`aad_med.report`
(writers). Each step of this command has its own module in this package, in the order they run:
:mod:`~aad_med.pipelines.caveats` (what to keep in mind about the inputs),
:mod:`~aad_med.pipelines.encoder_step` (one checkpoint: embedding, statistics, omnibus, figures;
with :mod:`~aad_med.pipelines.feature_scale`, :mod:`~aad_med.pipelines.omnibus_step`,
:mod:`~aad_med.pipelines.regional_step` and :mod:`~aad_med.pipelines.sharded`),
:mod:`~aad_med.pipelines.intensity_step` (the intensity fingerprint statistic),
:mod:`~aad_med.pipelines.subjects` (``subjects.csv``: which subjects are different) and
:mod:`~aad_med.pipelines.timings`. This module validates the inputs, orders the steps, combines
several encoders and stages the run folder; the command line is :mod:`aad_med.cli.compare`.

All outputs are first written into a hidden temporary folder inside the run folder and moved into
place only when everything succeeded, so a run folder never holds a half-written result set. A
run folder already holding results is refused before anything is read, unless ``overwrite``;
then the old results are replaced only once the new ones are complete.

Cohorts are validated before torch, MONAI and matplotlib are imported, so bad headers, grids and
layouts are reported in about a second. Voxels (NaN/Inf, empty volumes, segmentation labels) are
checked by the embedding's one decode of each file (the segmentation included), or beforehand by
validation with ``skip_invalid`` (which must know the bad subjects first); either way every
problem of every cohort is reported at once and nothing is written.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aad_med import DEFAULT_FEATURES
from aad_med.data.records import Cohort
from aad_med.data.validation import load_cohort
from aad_med.errors import CheckpointError, CohortError, ConfigError, InputError
from aad_med.io_utils import checkpoint_path_problem, file_digest
from aad_med.pipelines.caveats import input_caveats
from aad_med.pipelines.rundir import (
    acquire_run_lock,
    check_output_folder,
    check_run_dir,
    publish,
)
from aad_med.provenance import provenance
from aad_med.report.document import write_report
from aad_med.report.serialize import (
    write_distances_json,
)
from aad_med.report.text import overlap_warning

if TYPE_CHECKING:
    pass

log = logging.getLogger("aad_med.compare")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
RESULT_PATTERNS = (
    "distances.json",
    "report.md",
    "report.html",
    "embeddings.csv",
    "embeddings.npz",
    "pairwise_aad.csv",
    "intensity_fingerprint.csv",
    "subjects.csv",
    "plots/*.png",
    "mean_difference_*",
    "regional_aad*",
    "encoders/*/*",
)
"""Files ``aad-compare`` writes into its run folder: a run never writes over these unless told to
(``overwrite=true``)."""


@dataclass
class CompareSettings:
    """What ``aad-compare`` needs besides the checkpoint and cohorts (its Hydra config)."""

    n_permutations: int = 10_000
    n_bootstrap: int = 2000
    tests: Sequence[str] | None = None
    seed: int = 0
    device: str = "auto"
    features: str = DEFAULT_FEATURES
    batch_size: int = 32
    num_workers: int = 0
    cache: bool | str = True
    cache_dir: str | Path | None = None
    preprocessed_dir: str | Path | None = None
    preprocessed_max_gb: float = 20.0
    skip_invalid: bool = False
    regional: bool = True
    decode_means: bool = True
    bands_bootstrap: int = 1000
    intensity: bool = True
    calibration: str | Path | None = None
    # Folder/CSV whose subjects fix the feature scale when the checkpoint has no
    # feature_reference (embedding.reference; aad_med.pipelines.feature_scale).
    scale_reference: str | Path | None = None
    progress: bool = True
    overwrite: bool = False
    subjects: bool = True
    reference_cohort: str | None = None
    reference: str | Path | None = None
    extra: dict = field(default_factory=dict)

    def resolved_cache_mode(self) -> str:
        """``off``, ``read`` or ``write`` (``cache=true`` is ``write``)."""
        from aad_med.embedding.preprocessed import cache_mode

        return cache_mode(self.cache)

    def resolved_cache_dir(self) -> Path | None:
        """The embedding cache folder of these settings (``None``: caching off)."""
        if self.resolved_cache_mode() == "off":
            return None
        from aad_med.embedding.cache import default_cache_dir

        return Path(self.cache_dir) if self.cache_dir else default_cache_dir()


def check_cohort_names(names: Sequence[str]) -> None:
    """Cohort names end up in file names and Hydra keys: letters, digits, ``_ -`` (a ``.``
    would make Hydra nest the name); at least two cohorts.

    Raises:
        ConfigError: fewer than two cohorts or a name that cannot be a file name.
    """
    if len(names) < 2:
        raise ConfigError(
            f"aad-compare needs at least two cohorts, got {len(names)}: give each as "
            "cohorts.NAME=DIR_OR_CSV"
        )
    for name in names:
        if not NAME_PATTERN.match(str(name)):
            raise ConfigError(
                f"cohort name {name!r} must start with a letter or digit and contain only "
                "letters, digits, '_' and '-'"
            )


def load_cohorts(
    paths: Mapping[str, str | Path],
    skip_invalid: bool = False,
    checked_dir: str | Path | None = None,
    record_checked: bool = True,
    check_voxels: bool = True,
    digests_dir: str | Path | None = None,
) -> dict[str, Cohort]:
    """Discover and validate every cohort; all problems of all cohorts are reported together
    (``checked_dir``: subjects whose voxels already passed are not decoded again, their files'
    digests remembered in ``digests_dir``;
    ``check_voxels=False``: headers and grids only, :func:`aad_med.data.validation.validate_cohort`).

    Raises:
        CohortError: invalid subjects, unknown layouts, or a cohort with fewer than 2 subjects.
    """
    cohorts: dict[str, Cohort] = {}
    problems: list[str] = []
    for name, path in paths.items():
        try:
            cohort = load_cohort(
                path,
                skip_invalid=skip_invalid,
                check_voxels=check_voxels,
                checked_dir=checked_dir,
                record_checked=record_checked,
                digests_dir=digests_dir,
            )
        except CohortError as e:
            problems.extend(f"cohort {name}: {p}" for p in e.problems)
            continue
        except InputError as e:
            problems.append(f"cohort {name}: {e}")
            continue
        if len(cohort.subjects) < 2:
            problems.append(
                f"cohort {name}: {path}: has {len(cohort.subjects)} valid subject(s); "
                "comparing cohorts needs at least 2 per cohort"
            )
        cohorts[name] = cohort
    if problems:
        raise CohortError(problems)
    return cohorts


def train_overlap(cohort: Cohort, ckpt: Mapping) -> int:
    """How many of the cohort's subjects were used to train the encoder.

    With ``train_subjects`` in the checkpoint (``{"cohort": path, "subject_id": id}`` per
    training subject, as ``aad-train`` writes), a subject counts when its ID was trained on *from
    the same place*: the same cohort path, or files inside the training cohort's folder (the
    folder of a CSV manifest). Synthetic cohorts reuse IDs such as ``BraTS2021_00000``, so IDs
    alone would raise false alarms. Older checkpoints with only ``train_subject_ids`` are
    matched by ID.
    """
    from aad_med.embedding.encode import subject_folder

    entries = ckpt.get("train_subjects") or []
    if not entries:
        ids = {str(s) for s in (ckpt.get("train_subject_ids") or [])}
        return sum(rec.subject_id in ids for rec in cohort.subjects)
    owners: dict[str, set[Path]] = {}
    for entry in entries:
        owners.setdefault(str(entry["subject_id"]), set()).add(Path(str(entry["cohort"])))
    root = Path(cohort.path).resolve()
    count = 0
    for rec in cohort.subjects:
        places = owners.get(rec.subject_id)
        if not places:
            continue
        folder = Path(subject_folder(rec))
        for place in places:
            base = place if place.suffix.lower() != ".csv" else place.parent
            if place.resolve() == root or folder.is_relative_to(base.resolve()):
                count += 1
                break
    return count


def check_compare_dir(run_dir: str | Path, overwrite: bool) -> None:
    """Refuse a run folder that already holds comparison results unless ``overwrite``.

    Raises:
        ConfigError: one line naming the folder and saying what to set.
    """
    check_run_dir(
        run_dir, None, overwrite, delete=False, patterns=RESULT_PATTERNS, resume_hint=False
    )


def _remove_stale_temp(run_dir: Path) -> None:
    """Remove the temporary folders of runs killed before they finished (never results: those
    moved aside by an interrupted ``overwrite`` are kept)."""
    for stale in sorted(run_dir.glob(".aad-compare-*.tmp")):
        log.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)


def run_comparison(
    checkpoint: str | Path | Sequence[str | Path],
    cohort_paths: Mapping[str, str | Path],
    run_dir: str | Path,
    settings: CompareSettings | None = None,
) -> dict:
    """Compare cohorts with a trained encoder and write every output into ``run_dir``.

    With several checkpoints (e.g. one training recipe with seeds 0..4), the full output set is
    made with the first one; every encoder's ``distances.json`` and embeddings go to
    ``encoders/encoder{i}/``, and ``distances.json`` gains ``encoders``: the AAD of each pair
    per encoder, an interval combining subject bootstrap and encoder-to-encoder variance, and
    the rank stability of the pairwise AADs (:func:`aad_med.distances.combine_encoder_runs`).

    Args:
        checkpoint: a checkpoint written by ``aad-train``, or a list of them.
        cohort_paths: ``{name: folder or CSV manifest}``, at least two.
        run_dir: output folder (created); one that already holds results is refused unless
            ``settings.overwrite``.
        settings: statistics, embedding and output options.

    Returns:
        The content of ``distances.json``.

    Raises:
        ConfigError, CohortError, CheckpointError, InputError: one line per problem.
    """
    s = settings or CompareSettings()
    run_dir = Path(run_dir)
    check_compare_dir(run_dir, s.overwrite)
    names = list(cohort_paths)
    reference = None
    if s.reference:
        # A stored reference (aad-reference fit) is the first cohort; it is not re-encoded.
        from aad_med.pipelines.reference import load_reference

        reference = load_reference(s.reference)
        reference.check_features(str(s.features))
        if reference.name in names:
            raise ConfigError(
                f"cohort name {reference.name!r} is the stored reference's; name the new "
                "cohorts differently"
            )
        names = [reference.name, *names]
    check_cohort_names(names)
    if s.reference_cohort is not None and s.reference_cohort not in names:
        raise ConfigError(
            f"reference_cohort={s.reference_cohort!r} is not one of the cohorts {names}"
        )
    if isinstance(checkpoint, str | Path):
        ckpt_paths = [Path(checkpoint)]
    else:
        ckpt_paths = [Path(c) for c in checkpoint]
    if not ckpt_paths:
        raise ConfigError("checkpoint=PATH (or a list [PATH1,PATH2,...]) is required")
    for path in ckpt_paths:
        if problem := checkpoint_path_problem(path):
            raise CheckpointError(problem)
    multi = len(ckpt_paths) > 1
    if reference is not None:
        if multi:
            raise ConfigError("reference=REF holds one checkpoint's vectors: give one checkpoint")
        reference.check_checkpoint(file_digest(ckpt_paths[0]), ckpt_paths[0])
    if s.calibration and not Path(s.calibration).is_file():
        raise InputError(
            Path(s.calibration),
            "calibration file does not exist (give the calibration.json or calibration.csv "
            "written by aad-calibrate)",
        )
    checked = s.resolved_cache_dir()
    # The embedding decodes every file of every subject once (the seg too: check_seg) and
    # checks its voxels as it goes, so validation reads headers only; the first bad voxel makes
    # the whole validation run then, reporting every problem at once (_raise_every_voxel_problem).
    # Skipping invalid subjects needs the voxel checks beforehand.
    fold = not s.skip_invalid
    validation_t0 = time.perf_counter()
    try:
        cohorts = load_cohorts(
            cohort_paths,
            s.skip_invalid,
            checked_dir=None if checked is None else checked / "checked",
            record_checked=s.resolved_cache_mode() == "write",
            check_voxels=not fold,
            # The embedding cache's digest memo: the same groups of files, one memo file each.
            digests_dir=None if checked is None else checked / "digests",
        )
    except CohortError:
        if fold:  # the voxel problems of the same cohorts belong in the same report
            load_cohorts(cohort_paths, check_voxels=True)
        raise
    check_output_folder(run_dir, cohort_paths.values())
    caveats = input_caveats(cohort_paths, cohorts, ckpt_paths, s.n_permutations)
    for caveat in caveats:
        log.warning("caveat: %s", caveat)
    if s.calibration:
        from aad_med.calibration.table import read_calibration_table

        # A file that is not a calibration is refused before anything is encoded.
        read_calibration_table(Path(s.calibration))

    # Heavy imports only once the inputs are known to be valid.
    from aad_med.device import resolve_device
    from aad_med.distances import combine_encoder_runs
    from aad_med.pipelines.encoder_step import compare_with_encoder
    from aad_med.pipelines.intensity_step import add_intensity
    from aad_med.pipelines.timings import PhaseTimer
    from aad_med.training.checkpoint import load_model_from_checkpoint

    timer = PhaseTimer()
    timer.start = validation_t0  # the total covers validation too
    timer.add("validation", time.perf_counter() - validation_t0)
    device = resolve_device(s.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Only the run holding the folder may call other runs' temporary folders stale.
    release_lock = acquire_run_lock(run_dir)
    _remove_stale_temp(run_dir)
    tmp = run_dir / f".aad-compare-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        results = []
        for i, path in enumerate(ckpt_paths):
            model, preprocessing, ckpt = load_model_from_checkpoint(path, device)
            target = tmp if i == 0 else tmp / "encoders" / f"encoder{i}"
            target.mkdir(parents=True, exist_ok=True)
            try:
                results.append(
                    compare_with_encoder(
                        target,
                        model,
                        preprocessing,
                        ckpt,
                        path,
                        cohorts,
                        cohort_paths,
                        device,
                        s,
                        full=i == 0,
                        return_samples=multi,
                        reference=reference,
                        timer=timer,
                    )
                )
            except InputError as e:
                if fold and i == 0:  # the first encoder's embedding decodes every file
                    _raise_every_voxel_problem(cohort_paths, e)
                raise
        result = results[0]
        images = result.pop("_images", {})
        subject_input = result.pop("_subjects", None)
        # Fingerprints the embedding computed from the volumes it decoded (read once).
        computed_fingerprints = result.pop("_fingerprints", None)
        for res in results[1:]:
            res.pop("_fingerprints", None)
        if multi:
            combined = combine_encoder_runs(results, names=[str(p) for p in ckpt_paths])
            for i, res in enumerate(results):
                for pair in res["pairs"]:
                    pair.pop("aad_bootstrap_sample", None)
                if i > 0:
                    write_distances_json(tmp / "encoders" / f"encoder{i}" / "distances.json", res)
            result["encoders"] = combined
            result["checkpoints"] = [str(p.resolve()) for p in ckpt_paths]
            for name in result["cohorts"]:
                result["cohorts"][name]["train_overlap"] = max(
                    r["cohorts"][name]["train_overlap"] for r in results
                )
        fingerprints = None
        if s.intensity:
            with timer.phase("intensity"):
                fingerprints = add_intensity(
                    result, cohorts, s, tmp, reference, computed_fingerprints
                )
        if s.subjects:
            with timer.phase("subjects"):
                _add_subjects(
                    result, tmp, subject_input, cohorts, fingerprints or computed_fingerprints, s,
                    reference,
                )  # fmt: skip
        if s.calibration:
            from aad_med.calibration.equivalence import add_equivalent_severity

            add_equivalent_severity(result, s.calibration)
        _warn_overlap(result)
        result["caveats"] = caveats
        result["provenance"] = provenance(ckpt_paths)
        with timer.phase("figures_report"):
            write_distances_json(tmp / "distances.json", result)
            write_report(result, tmp, images)
        # Seconds per phase (differs between runs, unlike everything else in the file).
        result["timings"] = timer.record()
        write_distances_json(tmp / "distances.json", result)
        publish(tmp, run_dir, RESULT_PATTERNS, f".aad-compare-old-{secrets.token_hex(4)}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release_lock()
    return result


def _raise_every_voxel_problem(cohort_paths: Mapping[str, str | Path], error: InputError):
    """After a file failed its voxel checks during the embedding (``error`` names it), validate
    every cohort's voxels and raise the :class:`CohortError` listing every problem, as validation
    before the embedding would have (nothing is written: the run's folder is still temporary)."""
    load_cohorts(cohort_paths, check_voxels=True)
    raise CohortError([str(error)]) from error


def _add_subjects(result, tmp, subject_input, cohorts, fingerprints, s, reference) -> None:
    """The per-subject step (:func:`aad_med.pipelines.subjects.add_subjects`)."""
    from aad_med.pipelines.subjects import SubjectSettings, add_subjects

    vectors, ids, blocks, quality = subject_input
    given = fingerprints or {}
    if any(name not in given for name in cohorts) or (
        reference is not None and reference.name not in given
    ):
        from aad_med.data.intensity import cached_fingerprint

        write = s.resolved_cache_mode() == "write"
        fingerprints = {
            name: given[name]
            if name in given
            else cached_fingerprint(c, s.resolved_cache_dir(), write=write)
            for name, c in cohorts.items()
        }
        if reference is not None:
            fingerprints = {reference.name: reference.arrays["fingerprint"], **fingerprints}
    add_subjects(
        result,
        tmp,
        vectors,
        ids,
        blocks,
        {name: c.subjects for name, c in cohorts.items()},
        {name: fingerprints[name] for name in vectors},
        SubjectSettings(reference_cohort=s.reference_cohort),
        known_quality={
            **({reference.name: reference.arrays["quality"]} if reference is not None else {}),
            **quality,
        },
        drift=reference is not None and len(vectors) > 2,
    )


def _warn_overlap(result: dict) -> None:
    warning = overlap_warning(result["cohorts"])
    if warning:
        log.warning("!" * 80)
        log.warning("WARNING: %s", warning)
        log.warning("!" * 80)
    result["train_overlap_warning"] = warning
