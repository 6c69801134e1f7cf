"""``aad-compare``: the AAD between cohorts with calibrated statistics, figures and a report
(thin Hydra entry point over :func:`aad_med.pipelines.compare.run_comparison`).

Example::

    aad-compare checkpoint=runs/train/checkpoints/best.pt \\
        cohorts.site_a=data/site_a cohorts.site_b=data/site_b \\
        stats.n_permutations=10000 stats.n_bootstrap=2000 seed=0 hydra.run.dir=outputs/cmp

``checkpoint=[A.pt,B.pt,...]`` compares with several encoders (e.g. training seeds) and adds
their combined interval and rank stability.

``calibration=PATH`` (a ``calibration.json`` or ``.csv`` from ``aad-calibrate`` with the same
checkpoint and features) adds to every pair the artefact severities its AAD is comparable to.
aad-calibrate's config group is called ``shifts``, so no group collides with this key.

``cohorts.NAME=DIR_OR_CSV`` needs no leading ``+``: Hydra refuses new keys at compose time, so
:func:`open_cohort_overrides` rewrites them to ``++cohorts.NAME=...`` before Hydra sees them.

A ``hydra.run.dir`` that already holds results is refused before Hydra writes ``.hydra/`` into
it, unless ``overwrite=true`` (then the old results are replaced once the new ones are
complete). A run that fails leaves no folder behind unless the folder existed before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aad_med.cli._runfolder import (
    console_main,
    explicit_run_dir,
    flag,
)
from aad_med.errors import ConfigError

PROG = "aad-compare"
_COHORT_OVERRIDE = re.compile(r"^cohorts\.[^=]+=")

log = logging.getLogger("aad_med.compare")


def open_cohort_overrides(args: Sequence[str]) -> list[str]:
    """Turn ``cohorts.NAME=VALUE`` into ``++cohorts.NAME=VALUE`` (add or override), leaving every
    other argument (and already prefixed ones) as is."""
    return [f"++{a}" if _COHORT_OVERRIDE.match(a) else a for a in args]


def _cache_setting(cfg: DictConfig) -> str:
    """``cache=off|read|write`` and the older ``embedding.cache=true|false``: the stricter wins."""
    from aad_med.embedding.preprocessed import CACHE_MODES, cache_mode

    modes = [cache_mode(cfg.get("cache", "write")), cache_mode(cfg.embedding.get("cache", True))]
    return min(modes, key=CACHE_MODES.index)


def settings_from_config(cfg: DictConfig):
    """:class:`~aad_med.pipelines.compare.CompareSettings` from the composed config."""
    from aad_med.pipelines.compare import CompareSettings

    stats, emb = cfg.stats, cfg.embedding
    tests = stats.get("tests")
    return CompareSettings(
        n_permutations=int(stats.n_permutations),
        n_bootstrap=int(stats.n_bootstrap),
        tests=None if tests is None else [str(t) for t in tests],
        seed=int(cfg.seed),
        device=str(cfg.device),
        features=str(emb.features),
        batch_size=int(emb.batch_size),
        num_workers=int(emb.num_workers),
        cache=_cache_setting(cfg),
        cache_dir=emb.cache_dir,
        preprocessed_dir=emb.get("preprocessed_dir"),
        preprocessed_max_gb=float(emb.get("preprocessed_max_gb", 20)),
        skip_invalid=bool(cfg.skip_invalid),
        regional=bool(cfg.regional),
        decode_means=bool(cfg.decode_means),
        bands_bootstrap=int(stats.get("bands_bootstrap", 1000)),
        intensity=bool(stats.get("intensity", True)),
        progress=bool(emb.progress),
        overwrite=bool(cfg.get("overwrite", False)),
        calibration=None if cfg.get("calibration") is None else str(cfg.calibration),
        subjects=bool(cfg.get("subjects", True)),
        reference_cohort=(
            None if cfg.get("reference_cohort") is None else str(cfg.reference_cohort)
        ),
        reference=None if cfg.get("reference") is None else str(cfg.reference),
        scale_reference=None if emb.get("reference") is None else str(emb.reference),
    )


def compare_from_config(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the comparison described by a composed ``compare.yaml`` into ``run_dir``.

    Raises:
        ConfigError: no checkpoint or fewer than two cohorts given.
    """
    from aad_med.pipelines.sharded import run_comparison_sharded

    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError("checkpoint=PATH is required (a checkpoint written by aad-train)")
    cohorts = OmegaConf.to_container(cfg.cohorts, resolve=True) or {}
    cohorts = {str(k): str(v) for k, v in cohorts.items()}
    checkpoint = cfg.checkpoint
    # checkpoint=[A.pt,B.pt,...]: one comparison per encoder plus their combination.
    checkpoint = [str(c) for c in checkpoint] if OmegaConf.is_list(checkpoint) else str(checkpoint)
    result = run_comparison_sharded(checkpoint, cohorts, run_dir, settings_from_config(cfg))
    if result is None:  # a torchrun rank other than 0: it encoded its shards, rank 0 reports
        return {}
    for pair in result["pairs"]:
        log.info(
            "%s vs %s: AAD %.4g [%.4g, %.4g], p %.3g (FDR %.3g), %.3g x null median",
            pair["a"],
            pair["b"],
            pair["aad"],
            *pair["aad_ci95"],
            pair["aad_p"],
            pair["aad_p_fdr"],
            pair["aad_null_ratio"] or float("nan"),
        )
    print(f"{PROG}: wrote {Path(run_dir) / 'report.html'} and distances.json, plots/ in {run_dir}")
    return result


def _precheck_run_dir(argv: list[str]) -> None:
    """Refuse an explicit ``hydra.run.dir`` holding results before Hydra writes ``.hydra/`` there."""
    from aad_med.pipelines.compare import check_compare_dir

    run_dir = explicit_run_dir(argv)
    if run_dir is not None:
        check_compare_dir(run_dir, flag(argv, "overwrite"))


def main() -> None:
    """Console script entry point (``aad-compare``)."""
    from aad_med.pipelines.compare import RESULT_PATTERNS

    console_main(
        PROG,
        "compare",
        compare_from_config,
        RESULT_PATTERNS,
        _precheck_run_dir,
        open_cohort_overrides,
    )


if __name__ == "__main__":
    main()
