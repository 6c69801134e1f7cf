"""``aad-calibrate``: what an AAD value means for one encoder (thin Hydra entry point over
:func:`aad_med.calibration.run_calibration`).

Example::

    aad-calibrate checkpoint=runs/train/checkpoints/best.pt reference=data/site_a \\
        artefacts=[noise,blur,bias] severities.noise=[0.05,0.1,0.2] n_per_cohort=[5,10,20] \\
        repeats=20 stats.n_permutations=999 seed=0 hydra.run.dir=outputs/calib

``calibration=quick`` runs three artefacts at two severities with five repeats. Writes into the
run folder (each file complete or absent): ``calibration.csv`` (one row per artefact, severity,
cohort size and repeat), ``calibration.json`` (settings, summary, smallest reliably detected
severity, and the rows), ``calibration_curves.png``, ``power.png`` and, unless
``save_embeddings=false``, ``calibration_embeddings.npz``.

A ``hydra.run.dir`` that already holds results is refused before Hydra writes ``.hydra/`` into
it, unless ``overwrite=true``; a run that fails leaves no folder behind unless the folder existed
before. ``--verbose``/``-v`` shows tracebacks, as for the other console scripts.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from aad_med.cli._errors import run_reporting_errors, verbose_requested
from aad_med.cli._runfolder import (
    explicit_run_dir,
    flag,
    preexisting_run_dir,
    run_hydra_job,
    strip_verbose_flags,
)
from aad_med.errors import ConfigError

PROG = "aad-calibrate"
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
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

_preexisting_run_dir: Path | None = None
"""An explicit ``hydra.run.dir`` that existed before this run (never removed on failure)."""


def settings_from_config(cfg: DictConfig):
    """:class:`~aad_med.calibration.CalibrationSettings` from the composed config.

    Raises:
        ConfigError: a value of the wrong type (the message names the key).
    """
    from aad_med.calibration import CalibrationSettings

    def listed(key):
        value = cfg.get(key)
        if value is None:
            return None
        if OmegaConf.is_list(value):
            return OmegaConf.to_container(value, resolve=True)
        return [value]

    try:
        severities = (
            OmegaConf.to_container(cfg.severities, resolve=True) if cfg.get("severities") else None
        )
        sizes = listed("n_per_cohort")
        return CalibrationSettings(
            artefacts=[str(a) for a in (listed("artefacts") or [])],
            severities={
                str(k): [float(v) for v in (vals if isinstance(vals, list) else [vals])]
                for k, vals in (severities or {}).items()
            },
            n_per_cohort=None if sizes is None else [int(n) for n in sizes],
            repeats=int(cfg.repeats),
            fraction_affected=float(cfg.fraction_affected),
            n_permutations=int(cfg.stats.n_permutations),
            alpha=float(cfg.alpha),
            seed=int(cfg.seed),
            device=str(cfg.device),
            batch_size=int(cfg.embedding.batch_size),
            features=str(cfg.embedding.features),
            skip_invalid=bool(cfg.skip_invalid),
            max_subjects=None if cfg.get("max_subjects") is None else int(cfg.max_subjects),
            progress=bool(cfg.embedding.get("progress", True)),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid calibration setting: {e}") from None


def check_calibrate_dir(run_dir: str | Path, overwrite: bool) -> None:
    """Refuse a run folder that already holds calibration results unless ``overwrite=true``.

    Raises:
        ConfigError: one line naming the folder and saying what to set.
    """
    from aad_med.training.rundir import check_run_dir

    check_run_dir(run_dir, None, overwrite, delete=False, patterns=RESULT_FILES, resume_hint=False)


def write_outputs(result: dict, run_dir: str | Path, save_embeddings: bool = True) -> list[Path]:
    """Write every output of a calibration into ``run_dir``.

    Everything is first written into a hidden staging folder inside ``run_dir`` and moved into
    place only when all files exist, so a failure never leaves a partial result set.

    Returns:
        The written paths.
    """
    from aad_med.calibration.curves import calibration_csv_text
    from aad_med.plots.calibration import plot_calibration_curves, plot_power
    from aad_med.report.serialize import write_json

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = run_dir / f".calibration_tmp_{secrets.token_hex(4)}"
    stage.mkdir()
    meta = result["meta"]
    try:
        (stage / "calibration.csv").write_text(calibration_csv_text(result["rows"]), "utf-8")
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
        names = ["calibration.csv", "calibration.json", "calibration_curves.png", "power.png"]
        if save_embeddings:
            emb = result["embeddings"]
            np.savez(
                stage / "calibration_embeddings.npz",
                subject_ids=np.asarray(emb.subject_ids, dtype=str),
                artefact=np.asarray([a for a, _ in emb.conditions], dtype=str),
                severity=np.asarray([s for _, s in emb.conditions], dtype=np.float64),
                vectors=emb.vectors,
            )
            names.append("calibration_embeddings.npz")
        written = []
        for name in names:
            os.replace(stage / name, run_dir / name)
            written.append(run_dir / name)
        # With overwrite=true, an earlier run's file this run does not write must not pass for
        # one of its results (calibration_embeddings.npz after save_embeddings=false).
        for name in RESULT_FILES:
            if name not in names:
                (run_dir / name).unlink(missing_ok=True)
        return written
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def calibrate_from_config(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the calibration described by a composed ``calibrate.yaml`` into ``run_dir``.

    Raises:
        ConfigError: missing checkpoint or reference, or invalid settings.
    """
    for key, what in (
        ("checkpoint", "checkpoint=PATH (a checkpoint written by aad-train)"),
        ("reference", "reference=DIR_OR_CSV (the reference cohort)"),
    ):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ConfigError(f"{what} is required")
    run_dir = Path(run_dir)
    check_calibrate_dir(run_dir, bool(cfg.get("overwrite", False)))
    settings = settings_from_config(cfg)
    # torch and MONAI load only once the command line is known to be complete.
    from aad_med.calibration import run_calibration

    result = run_calibration(str(cfg.checkpoint), str(cfg.reference), settings)
    write_outputs(result, run_dir, bool(cfg.get("save_embeddings", True)))
    for artefact, by_n in result["minimum_detectable"].items():
        top = max(result["meta"]["artefacts"][artefact]["severities"])
        shown = ", ".join(
            f"n={n}: " + (f"above {top:g}" if s is None else f"{s:g}") for n, s in by_n.items()
        )
        log.info("%s: smallest severity detected in 80%% of repeats: %s", artefact, shown)
    print(
        f"{PROG}: wrote calibration.csv, calibration.json, calibration_curves.png and power.png "
        f"in {run_dir}"
    )
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="calibrate")
def _hydra_main(cfg: DictConfig) -> None:
    run_hydra_job(PROG, cfg, calibrate_from_config, RESULT_FILES, _preexisting_run_dir)


def main() -> None:
    """Console script entry point (``aad-calibrate``)."""
    from aad_med.training.rundir import register_resolvers

    global _preexisting_run_dir
    register_resolvers()
    argv = strip_verbose_flags(sys.argv[1:])
    run_dir = explicit_run_dir(argv)
    _preexisting_run_dir = preexisting_run_dir(argv)
    if run_dir is not None:
        # Before Hydra writes .hydra/ into it: a refused run leaves the folder untouched.
        rc = run_reporting_errors(
            PROG,
            lambda: check_calibrate_dir(run_dir, flag(argv, "overwrite")),
            verbose=verbose_requested(argv),
        )
        if rc:
            sys.exit(rc)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


if __name__ == "__main__":
    main()
