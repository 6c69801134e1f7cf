"""``aad-calibrate``: what an AAD value means for one encoder (thin Hydra entry point over
:func:`aad_med.pipelines.calibrate.calibrate`).

Example::

    aad-calibrate checkpoint=runs/train/checkpoints/best.pt reference=data/site_a \\
        artefacts=[noise,blur,bias] severities.noise=[0.05,0.1,0.2] n_per_cohort=[5,10,20] \\
        repeats=20 stats.n_permutations=999 seed=0 hydra.run.dir=outputs/calib

``shifts=quick`` runs three artefacts at two severities with five repeats. Writes into the
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
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aad_med.cli._errors import run_reporting_errors, verbose_requested
from aad_med.cli._runfolder import (
    explicit_run_dir,
    flag,
    hydra_command,
    print_version_if_asked,
    strip_verbose_flags,
)
from aad_med.errors import ConfigError

PROG = "aad-calibrate"

log = logging.getLogger("aad_med.calibrate")


def settings_from_config(cfg: DictConfig):
    """:class:`~aad_med.calibration.CalibrationSettings` from the composed config.

    Raises:
        ConfigError: a value of the wrong type (the message names the key).
    """
    from aad_med.pipelines.calibrate import CalibrationSettings

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
    from aad_med.pipelines.calibrate import calibrate, check_calibrate_dir

    run_dir = Path(run_dir)
    check_calibrate_dir(run_dir, bool(cfg.get("overwrite", False)))
    settings = settings_from_config(cfg)
    # torch and MONAI load only once the command line is known to be complete.
    result = calibrate(
        cfg.checkpoint,
        cfg.reference,
        run_dir,
        settings,
        save_embeddings=bool(cfg.get("save_embeddings", True)),
        overwrite=bool(cfg.get("overwrite", False)),
    )
    print(
        f"{PROG}: wrote calibration.csv, calibration.json, calibration_curves.png and power.png "
        f"in {run_dir}"
    )
    return result


def main() -> None:
    """Console script entry point (``aad-calibrate``)."""
    argv = strip_verbose_flags(sys.argv[1:])
    print_version_if_asked(PROG, argv)
    run_dir = explicit_run_dir(argv)
    if run_dir is not None:
        from aad_med.pipelines.calibrate import check_calibrate_dir

        # Before Hydra writes .hydra/ into it: a refused run leaves the folder untouched.
        rc = run_reporting_errors(
            PROG,
            lambda: check_calibrate_dir(run_dir, flag(argv, "overwrite")),
            verbose=verbose_requested(argv),
        )
        if rc:
            sys.exit(rc)
    from aad_med.pipelines.calibrate import RESULT_FILES

    hydra_command(PROG, "calibrate", calibrate_from_config, RESULT_FILES, argv)


if __name__ == "__main__":
    main()
