"""The body of ``aad-calibrate``: what an AAD value means for one encoder.

:func:`run_calibration` encodes a reference cohort under graded artefacts and computes the
calibration curves (nothing written); :func:`calibrate` does that and writes every output into a
run folder (``calibration.csv``, ``calibration.json`` with its provenance block, the two figures
and, unless told otherwise, ``calibration_embeddings.npz``), each file complete or absent. The
command line is :mod:`aad_med.cli.calibrate`; the stages are :mod:`aad_med.calibration`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aad_med import DEFAULT_FEATURES
from aad_med.calibration.curves import (
    ConditionEmbeddings,
    calibration_rows,
    calibration_summary,
    check_sizes,
    minimum_detectable,
    smallest_attainable_p,
)
from aad_med.data.artefacts import ARTEFACTS, severity_ladders
from aad_med.errors import CheckpointError, ConfigError
from aad_med.io_utils import checkpoint_path_problem, file_digest
from aad_med.provenance import provenance

PROG = "aad-calibrate"
RESULT_FILES = (
    "calibration.csv",
    "calibration.json",
    "calibration_curves.png",
    "power.png",
    "calibration_embeddings.npz",
)
"""Files ``aad-calibrate`` writes into its run folder: never written over unless
``overwrite=true``."""

log = logging.getLogger("aad_med.calibrate")


@dataclass
class CalibrationSettings:
    """What a calibration run needs besides the checkpoint and the reference cohort.

    Attributes:
        artefacts: artefact names (see :data:`~aad_med.data.artefacts.ARTEFACTS`).
        severities: per-artefact severity ladders; missing artefacts use the defaults.
        n_per_cohort: cohort sizes to compare; ``None`` picks up to three sizes up to half
            the reference.
        repeats: random disjoint splits per (artefact, severity, n).
        fraction_affected: share of the shifted cohort's subjects that carry the artefact.
        n_permutations: label shuffles per permutation test.
        alpha: significance level of the detection rate.
        seed: seeds the splits, the permutations and every subject's artefact pattern.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: patches per forward pass.
        features: embedding feature set (``latent``: the AAD of ``aad-compare``).
        skip_invalid: leave invalid reference subjects out instead of stopping.
        max_subjects: use only the first this many reference subjects (``None``: all).
        progress: tqdm bar while encoding.
    """

    artefacts: Sequence[str] = tuple(ARTEFACTS)
    severities: Mapping[str, Sequence[float]] | None = None
    n_per_cohort: Sequence[int] | None = None
    repeats: int = 20
    fraction_affected: float = 1.0
    n_permutations: int = 999
    alpha: float = 0.05
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    features: str = DEFAULT_FEATURES
    skip_invalid: bool = False
    max_subjects: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raises:
        ConfigError: a value out of range (the message names the key)."""
        if int(self.repeats) < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if not 0.0 < float(self.fraction_affected) <= 1.0:
            raise ConfigError(f"fraction_affected must be in (0, 1], got {self.fraction_affected}")
        if int(self.n_permutations) < 1:
            raise ConfigError(f"stats.n_permutations must be >= 1, got {self.n_permutations}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.max_subjects is not None and int(self.max_subjects) < 4:
            raise ConfigError(f"max_subjects must be >= 4 (or null), got {self.max_subjects}")
        if self.n_per_cohort is not None:
            bad = [n for n in self.n_per_cohort if int(n) < 2]
            if bad or not list(self.n_per_cohort):
                raise ConfigError(
                    f"n_per_cohort must list sizes >= 2 (or be null), got {list(self.n_per_cohort)}"
                )


def load_reference(
    reference: str | Path, skip_invalid: bool = False, max_subjects: int | None = None
):
    """Discover and validate the reference cohort.

    Raises:
        CohortError: invalid subjects (all listed). ConfigError: fewer than 4 subjects.
    """
    from aad_med.data.validation import load_cohort

    cohort = load_cohort(reference, skip_invalid=skip_invalid)
    if max_subjects is not None:
        cohort.subjects = list(cohort.subjects)[: int(max_subjects)]
    check_sizes(None, len(cohort.subjects))
    return cohort


def run_calibration(
    checkpoint: str | Path,
    reference: str | Path,
    settings: CalibrationSettings | None = None,
    on_embedded: Callable[[ConditionEmbeddings], None] | None = None,
) -> dict:
    """Calibrate a checkpoint's AAD on a reference cohort (nothing is written).

    Returns:
        A dict with ``rows`` (:data:`CALIBRATION_COLUMNS`), ``summary``
        (:func:`calibration_summary`), ``minimum_detectable``, ``embeddings``
        (:class:`ConditionEmbeddings`) and ``meta`` (settings, checkpoint, reference, timing).

    Raises:
        CheckpointError, CohortError, ConfigError, InputError: one line per problem.
    """
    from aad_med.training.checkpoint import load_model_from_checkpoint

    settings = settings or CalibrationSettings()
    settings.check()
    ladders = severity_ladders(list(settings.artefacts), settings.severities)
    cohort = load_reference(reference, settings.skip_invalid, settings.max_subjects)
    sizes = check_sizes(settings.n_per_cohort, len(cohort.subjects))
    floor = {n: smallest_attainable_p(n) for n in sizes}
    blind = [n for n, p in floor.items() if p > settings.alpha]
    if blind:
        log.warning(
            "with %s subjects per cohort no shift can reach p <= %g (the smallest possible "
            "permutation p is %s): their detection rate is 0 by construction",
            ", ".join(map(str, blind)),
            settings.alpha,
            ", ".join(f"{floor[n]:.3g}" for n in blind),
        )
    # Before torch loads: a folder or device is named as such, not as a missing file.
    if problem := checkpoint_path_problem(checkpoint):
        raise CheckpointError(problem)
    from aad_med.calibration.conditions import embed_conditions
    from aad_med.device import resolve_device

    device = resolve_device(settings.device)
    model, preprocessing, ckpt = load_model_from_checkpoint(checkpoint, device)
    overlap = sorted(set(ckpt.get("train_subject_ids") or []) & set(cohort.subject_ids))
    if overlap:
        log.warning(
            "%d reference subject(s) were used to train this checkpoint (e.g. %s): their "
            "embeddings may be tighter than those of unseen data",
            len(overlap),
            overlap[0],
        )
    from aad_med.embedding.features import get_feature_set
    from aad_med.pipelines.feature_scale import attach_reference

    # The checkpoint's fixed scale, so severities are read on the scale aad-compare uses.
    feature_set = get_feature_set(settings.features)
    scale = attach_reference(feature_set, ckpt)
    emb = embed_conditions(
        model,
        cohort.subjects,
        preprocessing,
        ladders,
        seed=settings.seed,
        device=device,
        batch_size=settings.batch_size,
        features=feature_set,
        progress=settings.progress,
    )
    if on_embedded is not None:
        on_embedded(emb)
    t0 = time.perf_counter()
    rows = calibration_rows(
        emb,
        ladders,
        sizes,
        settings.repeats,
        settings.fraction_affected,
        settings.n_permutations,
        settings.alpha,
        settings.seed,
    )
    summary = calibration_summary(rows, settings.alpha)
    meta = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_digest(checkpoint),
        "reference": str(reference),
        "n_reference_subjects": len(cohort.subjects),
        "reference_subject_ids": cohort.subject_ids,
        "reference_skipped": [str(s) for s in getattr(cohort, "skipped", [])],
        "train_overlap": overlap,
        "preprocessing": preprocessing.to_dict(),
        "artefacts": {
            name: {
                "description": ARTEFACTS[name].description,
                "severity_unit": ARTEFACTS[name].severity_unit,
                "severities": ladder,
            }
            for name, ladder in ladders.items()
        },
        "n_per_cohort": sizes,
        "smallest_attainable_p": {str(n): p for n, p in floor.items()},
        "settings": {k: v for k, v in asdict(settings).items() if k != "extra"},
        # How the features were standardised (aad_med.embedding.standardize): "checkpoint"
        # puts every AAD on aad-compare's scale for this checkpoint.
        "scale": scale,
        "encode_seconds": emb.seconds,
        "statistics_seconds": time.perf_counter() - t0,
    }
    return {
        "rows": rows,
        "summary": summary,
        "minimum_detectable": minimum_detectable(summary),
        "embeddings": emb,
        "meta": meta,
    }


def check_calibrate_dir(run_dir: str | Path, overwrite: bool) -> None:
    """Refuse a run folder that already holds calibration results unless ``overwrite=true``.

    Raises:
        ConfigError: one line naming the folder and saying what to set.
    """
    from aad_med.pipelines.rundir import check_run_dir

    check_run_dir(run_dir, None, overwrite, delete=False, patterns=RESULT_FILES, resume_hint=False)


def write_outputs(result: dict, run_dir: str | Path, save_embeddings: bool = True) -> list[Path]:
    """Write every output of a calibration into ``run_dir``.

    Everything is first written into a hidden staging folder inside ``run_dir`` and moved into
    place only when all files exist, so a failure never leaves a partial result set.

    Returns:
        The written paths.
    """
    from aad_med.calibration.table import calibration_csv_text
    from aad_med.io_utils import write_text_atomic
    from aad_med.pipelines.rundir import publish
    from aad_med.plots.calibration import plot_calibration_curves, plot_power
    from aad_med.report.serialize import write_json

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = run_dir / f".calibration_tmp_{secrets.token_hex(4)}"
    stage.mkdir()
    meta = result["meta"]
    try:
        write_text_atomic(stage / "calibration.csv", calibration_csv_text(result["rows"]))
        units = {a: d["severity_unit"] for a, d in meta["artefacts"].items()}
        alpha = float(meta["settings"]["alpha"])
        plot_calibration_curves(result["summary"], stage / "calibration_curves.png", units)
        plot_power(result["summary"], stage / "power.png", alpha)
        payload = {
            "tool": PROG,
            **meta,
            "how_to_read": (
                "Each row of 'summary' is the mean AAD (and its 2.5-97.5 percentile band over "
                "repeats) between n clean reference subjects and n other reference subjects "
                "carrying the artefact at that severity; severity 0 is clean vs clean (the null "
                "level for cohorts of that size). detection_rate is the share of repeats with "
                "p <= alpha: the power to detect that shift with n subjects per cohort. "
                "minimum_detectable gives, per artefact and n, the smallest severity detected in "
                "at least 80% of repeats. AAD values are specific to this checkpoint."
            ),
            "summary": result["summary"],
            "minimum_detectable": result["minimum_detectable"],
            "rows": result["rows"],
        }
        write_json(stage / "calibration.json", payload)
        if save_embeddings:
            emb = result["embeddings"]
            np.savez(
                stage / "calibration_embeddings.npz",  # in the staging folder: no reader yet
                subject_ids=np.asarray(emb.subject_ids, dtype=str),
                artefact=np.asarray([a for a, _ in emb.conditions], dtype=str),
                severity=np.asarray([s for _, s in emb.conditions], dtype=np.float64),
                vectors=emb.vectors,
            )
        # With overwrite=true, an earlier run's file this run does not write must not pass for
        # one of its results (calibration_embeddings.npz after save_embeddings=false): publish
        # moves every earlier result aside before the new ones go in.
        aside = f".calibration-old-{secrets.token_hex(4)}"
        return publish(stage, run_dir, RESULT_FILES, aside)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def calibrate(
    checkpoint: str | Path,
    reference: str | Path,
    run_dir: str | Path,
    settings: CalibrationSettings | None = None,
    save_embeddings: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run a calibration and write every output into ``run_dir`` (the whole ``aad-calibrate``).

    Raises:
        CheckpointError, CohortError, ConfigError, InputError: one line per problem; a folder
            already holding results is refused unless ``overwrite``.
    """
    run_dir = Path(run_dir)
    check_calibrate_dir(run_dir, overwrite)
    from aad_med.pipelines.rundir import check_output_folder

    check_output_folder(run_dir, [reference])
    result = run_calibration(str(checkpoint), str(reference), settings)
    result["meta"]["provenance"] = provenance(checkpoint)
    write_outputs(result, run_dir, save_embeddings)
    for artefact, by_n in result["minimum_detectable"].items():
        top = max(result["meta"]["artefacts"][artefact]["severities"])
        shown = ", ".join(
            f"n={n}: " + (f"above {top:g}" if s is None else f"{s:g}") for n, s in by_n.items()
        )
        log.info("%s: smallest severity detected in 80%% of repeats: %s", artefact, shown)
    return result
