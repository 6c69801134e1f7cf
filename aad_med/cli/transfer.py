"""``aad-transfer``: does the AAD predict what a segmentation model loses on another cohort?
(thin Hydra entry point over :mod:`aad_med.pipelines.transfer`).

Example::

    aad-transfer checkpoint=runs/train/checkpoints/best.pt source=data/site_a \\
        targets.b=data/site_b targets.c=data/site_c targets.d=data/site_d \\
        segmenter.max_epochs=20 seed=0 hydra.run.dir=outputs/transfer

``performance=scores.csv`` (``cohort,subject_id,score``) relates the distances to your own
model's per-subject scores instead of training a segmenter. ``target=DIR sources.NAME=DIR ...``
ranks candidate training cohorts for one target (``verify=true`` trains one segmenter per source
to check the ranking).

``targets.NAME=`` and ``sources.NAME=`` need no leading ``+``: :func:`open_cohort_overrides`
rewrites them to ``++...`` before Hydra sees them. A ``hydra.run.dir`` that already holds results
is refused before Hydra writes into it, unless ``overwrite=true``; a run that fails leaves no
folder behind unless the folder existed before.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from aad_med.cli._runfolder import (
    console_main,
    explicit_run_dir,
    flag,
    override_value,
)
from aad_med.errors import ConfigError

PROG = "aad-transfer"
_COHORT_OVERRIDE = re.compile(r"^(targets|sources)\.[^=]+=")

log = logging.getLogger("aad_med.transfer")


def open_cohort_overrides(args: Sequence[str]) -> list[str]:
    """Turn ``targets.NAME=V`` and ``sources.NAME=V`` into ``++...`` (add or override)."""
    return [f"++{a}" if _COHORT_OVERRIDE.match(a) else a for a in args]


def settings_from_config(cfg: DictConfig):
    """:class:`~aad_med.pipelines.transfer.TransferSettings` from the composed config."""
    from aad_med.pipelines.transfer import TransferSettings
    from aad_med.segmentation.network import SegmenterConfig
    from aad_med.segmentation.training import SegmentationSettings

    seg = OmegaConf.to_container(cfg.segmenter, resolve=True)
    net_keys = {"architecture", "regions", "channels", "strides", "num_res_units", "init_filters",
                "dropout"}  # fmt: skip
    network = SegmenterConfig(**{k: seg.pop(k) for k in net_keys if k in seg})
    known = set(SegmentationSettings.__dataclass_fields__)
    unknown = sorted(set(seg) - known)
    if unknown:
        raise ConfigError(f"unknown segmenter key(s) {unknown}")
    segmenter = SegmentationSettings(network=network, seed=int(cfg.seed), **seg)
    return TransferSettings(
        segmenter=segmenter,
        features=str(cfg.embedding.features),
        n_permutations=int(cfg.stats.n_permutations),
        n_bootstrap=int(cfg.stats.n_bootstrap),
        correlation_bootstrap=int(cfg.correlation_bootstrap),
        device=str(cfg.device),
        batch_size=int(cfg.embedding.batch_size),
        performance=None if cfg.performance is None else str(cfg.performance),
        verify=bool(cfg.verify),
        seed=int(cfg.seed),
        progress=bool(cfg.embedding.progress) and sys.stderr.isatty(),
    )


def _named(path, name) -> tuple[str, str]:
    return (str(name) if name else Path(str(path)).name.removesuffix(".csv"), str(path))


def transfer_from_config(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the transfer (or selection) described by a composed ``transfer.yaml``.

    Raises:
        ConfigError: no checkpoint, or neither ``source`` + ``targets`` nor ``target`` +
            ``sources`` given (or both).
    """
    from aad_med.pipelines.rundir import check_run_dir
    from aad_med.pipelines.selection import run_selection
    from aad_med.pipelines.transfer import RESULT_PATTERNS, run_transfer

    if OmegaConf.is_missing(cfg, "checkpoint") or not cfg.checkpoint:
        raise ConfigError(
            "checkpoint=PATH is required (an encoder checkpoint written by aad-train)"
        )
    targets = {str(k): str(v) for k, v in (OmegaConf.to_container(cfg.targets) or {}).items()}
    sources = {str(k): str(v) for k, v in (OmegaConf.to_container(cfg.sources) or {}).items()}
    transfer = cfg.source is not None or bool(targets)
    selection = cfg.target is not None or bool(sources)
    if transfer == selection:
        raise ConfigError(
            "give either source=DIR with targets.NAME=DIR (transfer) or target=DIR with "
            "sources.NAME=DIR (source selection)"
        )
    resume = cfg.segmenter.get("resume")
    check_run_dir(run_dir, resume, bool(cfg.overwrite), patterns=RESULT_PATTERNS, resume_hint=False)
    settings = settings_from_config(cfg)
    if transfer:
        if cfg.source is None:
            raise ConfigError("transfer mode needs source=DIR_OR_CSV (the training cohort)")
        result = run_transfer(
            str(cfg.checkpoint), _named(cfg.source, cfg.source_name), targets, run_dir, settings
        )
        for name, corr in result["correlations"].items():
            if corr["spearman"] is not None:
                log.info(
                    "%s vs drop: Spearman %.3f %s", name, corr["spearman"], corr["spearman_ci95"]
                )
    else:
        if cfg.target is None:
            raise ConfigError("selection mode needs target=DIR_OR_CSV (the cohort to serve)")
        result = run_selection(
            str(cfg.checkpoint), _named(cfg.target, cfg.target_name), sources, run_dir, settings
        )
    print(f"{PROG}: wrote {Path(run_dir) / 'transfer.json'} and transfer.md in {run_dir}")
    return result


def _precheck_run_dir(argv: list[str]) -> None:
    """Refuse an explicit ``hydra.run.dir`` holding results before Hydra writes ``.hydra/`` there."""
    from aad_med.pipelines.rundir import check_run_dir
    from aad_med.pipelines.transfer import RESULT_PATTERNS

    run_dir = explicit_run_dir(argv)
    if run_dir is not None:
        resume = override_value(argv, "segmenter.resume")
        check_run_dir(
            run_dir, resume, flag(argv, "overwrite"), delete=False, patterns=RESULT_PATTERNS,
            resume_hint=False,
        )  # fmt: skip


def main() -> None:
    """Console script entry point (``aad-transfer``)."""
    from aad_med.pipelines.transfer import RESULT_PATTERNS

    console_main(
        PROG,
        "transfer",
        transfer_from_config,
        RESULT_PATTERNS,
        _precheck_run_dir,
        open_cohort_overrides,
    )


if __name__ == "__main__":
    main()
