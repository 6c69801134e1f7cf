"""The body of ``aad-train``: one training run from a composed config to a finished run folder.

Order matters for safety: the run folder is checked for earlier results before anything is
written; cohorts are validated before training starts; the resolved config, checkpoints and
figures are written by rank 0 only. Called by ``aad-train`` (``aad_med.cli.train``) and by tests.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import aad_med
from aad_med.data.records import SubjectRecord
from aad_med.errors import CohortError, ConfigError, InputError
from aad_med.io_utils import write_json_atomic, write_text_atomic
from aad_med.pipelines.rundir import check_run_dir
from aad_med.provenance import provenance
from aad_med.training.checkpoint import check_resume_compatible, load_checkpoint
from aad_med.training.config import (
    as_list,
    instantiate,
    missing_keys,
    preprocessing_from_config,
    settings_from_config,
    split_subjects,
)
from aad_med.training.distributed import (
    DistInfo,
    barrier,
    cleanup_distributed,
    env_rank,
    launched_by_torchrun,
    setup_distributed,
)
from aad_med.training.loggers import NullLogger
from aad_med.training.loop import FitResult, Trainer, seed_everything

log = logging.getLogger("aad_med.train")


def synthetic_cohort_dir(cfg: DictConfig) -> Path:
    """Folder of the synthetic training cohort described by ``data.synthetic``."""
    syn = cfg.data.synthetic
    if syn.get("dir"):
        return Path(syn.dir)
    shape = "x".join(str(int(s)) for s in syn.shape)
    name = f"{syn.site}-n{int(syn.n_subjects)}-seed{int(syn.seed)}-{shape}-{syn.get('layout', 'brats2021')}"
    return Path(cfg.paths.data_dir) / "synthetic" / name


def _ensure_synthetic(cfg: DictConfig, info: DistInfo) -> Path:
    from aad_med.data.synthetic import generate_cohort

    folder = synthetic_cohort_dir(cfg)
    syn = cfg.data.synthetic
    if info.is_main and not (folder / "synthetic.json").exists():
        log.info("generating synthetic training cohort in %s", folder)
        generate_cohort(
            folder,
            n_subjects=int(syn.n_subjects),
            site=str(syn.site),
            seed=int(syn.seed),
            shape=[int(s) for s in syn.shape],
            layout=str(syn.get("layout", "brats2021")),
        )
    barrier(info)
    return folder


def load_training_subjects(
    cfg: DictConfig, info: DistInfo
) -> tuple[list[SubjectRecord], list[str], list[str]]:
    """Validated subjects of every cohort in ``data.cohorts`` (or the synthetic cohort).

    Returns:
        ``(records, cohort of each record, cohort paths)``.

    Raises:
        CohortError: invalid cohorts (every problem of every cohort, one line each).
        ConfigError: no cohort given and no synthetic cohort configured.
    """
    from aad_med.data.validation import load_cohort

    paths = [str(p) for p in as_list(cfg.data.cohorts)]
    if not paths:
        if cfg.data.get("synthetic") is None:
            raise ConfigError("data.cohorts is empty; set data.cohorts=[DIR_OR_CSV,...]")
        paths = [str(_ensure_synthetic(cfg, info))]
    records: list[SubjectRecord] = []
    owners: list[str] = []
    resolved: list[str] = []
    problems: list[str] = []
    for p in paths:
        # Every cohort is checked, so all problems of all cohorts are reported at once.
        try:
            cohort = load_cohort(p, skip_invalid=bool(cfg.data.get("skip_invalid", False)))
        except CohortError as e:
            problems.extend(e.problems)
            continue
        except InputError as e:
            problems.append(str(e))
            continue
        for line in cohort.skipped:
            log.warning("skipped: %s", line)
        where = str(Path(p).resolve())
        resolved.append(where)
        records.extend(cohort.subjects)
        owners.extend([where] * len(cohort.subjects))
    if problems:
        raise CohortError(problems)
    if not records:
        raise ConfigError(f"no valid subjects in data.cohorts={paths}")
    return records, owners, resolved


def move_cache_to(dataset: torch.utils.data.Dataset, device: torch.device) -> int:
    """Move the cached preprocessed images of a memory-cached patch dataset to ``device``.

    Patches are then cut on the device and no image crosses the PCIe bus per step. Returns
    the number of subjects moved.

    Raises:
        ConfigError: the dataset has no memory cache.
    """
    subjects = getattr(dataset, "subjects", None)
    cache = getattr(subjects, "_cache", None)
    if cache is None:
        raise ConfigError("trainer.cache_on_device needs data.cache=memory")
    moved = 0
    for item in cache:
        if isinstance(item, dict) and isinstance(item.get("image"), torch.Tensor):
            item["image"] = item["image"].to(device)
            moved += 1
    return moved


def _silence_non_main(info: DistInfo) -> None:
    if info.is_main:
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
    logging.getLogger("aad_med").setLevel(logging.WARNING)


def train_from_config(cfg: DictConfig, run_dir: str | Path) -> FitResult:
    """Run one training described by a composed ``train.yaml`` config, writing into ``run_dir``.

    Writes ``config.yaml``, ``checkpoints/last.pt`` and ``best.pt``, ``tensorboard/`` (with
    ``logger=tensorboard``), ``loss_curve.png`` and ``reconstructions.png``.

    Raises:
        ConfigError: missing mandatory values, inconsistent settings, or a run folder that
            already holds results (neither resumed nor ``overwrite=true``).
        CohortError / InputError / CheckpointError / NonFiniteLossError: see their stages.
    """
    run_dir = Path(run_dir)
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError(
            f"missing mandatory value(s): {', '.join(missing)}; set them on the command line "
            f"(e.g. {missing[0]}=...)"
        )
    settings = settings_from_config(cfg)
    mode = str(cfg.trainer.get("distributed", "auto"))
    if mode not in ("auto", "required"):
        raise ConfigError(f"trainer.distributed must be auto or required, got {mode!r}")
    if mode == "required" and not launched_by_torchrun():
        raise ConfigError(
            "trainer=ddp needs several processes: launch with "
            "`torchrun --nproc_per_node=N -m aad_med.cli.train trainer=ddp ...`"
        )
    # Every rank checks before any rank can write (writing starts after the process group forms).
    check_run_dir(
        run_dir, settings.resume, bool(cfg.get("overwrite", False)), delete=env_rank() == 0
    )
    if settings.resume:
        # Fail before minutes of data loading (and before config.yaml is rewritten) when the
        # checkpoint is unusable, unsafe, or from a run with other data or settings.
        check_resume_compatible(
            settings.resume,
            load_checkpoint(settings.resume),
            OmegaConf.to_container(cfg, resolve=True),
        )
    prep = preprocessing_from_config(cfg.data)
    model_patch = cfg.model.get("patch_size")
    if model_patch is not None and int(model_patch) != prep.patch_size:
        raise ConfigError(
            f"model.patch_size={model_patch} differs from data.patch_size={prep.patch_size}; "
            "leave model.patch_size at its default ${data.patch_size}"
        )
    if int(cfg.model.get("in_channels", 4)) != len(prep.channels):
        raise ConfigError(f"model.in_channels must be {len(prep.channels)} (t1, t1ce, t2, flair)")
    samples = int(cfg.data.samples_per_subject)
    if samples < 1:
        raise ConfigError(f"data.samples_per_subject must be >= 1, got {samples}")

    info = setup_distributed(str(cfg.trainer.device))
    try:
        _silence_non_main(info)
        return _run(cfg, run_dir, settings, prep, samples, info)
    finally:
        cleanup_distributed()


def _run(cfg, run_dir, settings, prep, samples, info: DistInfo) -> FitResult:
    from aad_med.data.datasets import build_train_dataset, train_collate

    records, owners, cohort_paths = load_training_subjects(cfg, info)
    train_idx, val_idx = split_subjects(len(records), float(cfg.data.val_fraction), settings.seed)
    train_records = [records[i] for i in train_idx]
    val_records = [records[i] for i in val_idx]
    log.info(
        "%d training and %d validation subjects from %d cohort(s); device %s, %d process(es)",
        len(train_records),
        len(val_records),
        len(cohort_paths),
        info.device,
        info.world_size,
    )
    data = cfg.data
    augment = data.get("augment")
    augment = OmegaConf.to_container(augment, resolve=True) if augment is not None else None
    common = {
        "cfg": prep,
        "samples_per_subject": samples,
        "cache": str(data.cache),
        "cache_dir": data.get("cache_dir"),
        "tumour_ratio": float(data.tumour_ratio),
        "num_workers": int(data.num_workers),
    }
    train_ds = build_train_dataset(train_records, augment=augment, seed=settings.seed, **common)
    val_ds = None
    if val_records:
        val_ds = build_train_dataset(val_records, augment=None, seed=settings.seed + 1, **common)
    if bool(cfg.trainer.get("cache_on_device", False)) and info.device.type == "cuda":
        if settings.num_workers:
            raise ConfigError("trainer.cache_on_device needs data.num_workers=0")
        for ds in (train_ds, val_ds):
            if ds is not None:
                move_cache_to(ds, info.device)

    seed_everything(settings.seed)
    model = instantiate(cfg.model, "model")
    optimizer_factory = instantiate(cfg.optim.optimizer, "optim.optimizer")
    logger = NullLogger()
    if info.is_main and cfg.get("logger") is not None:
        logger = instantiate(cfg.logger, "logger", log_dir=str(run_dir / "tensorboard"))

    container = OmegaConf.to_container(cfg, resolve=True)
    metadata = {
        "config": container,
        "preprocessing": prep.to_dict(),
        "train_subject_ids": [r.subject_id for r in train_records],
        "val_subject_ids": [r.subject_id for r in val_records],
        "train_subjects": [
            {"cohort": owners[i], "subject_id": records[i].subject_id} for i in train_idx
        ],
        "cohorts": cohort_paths,
        "versions": {
            "aad_med": aad_med.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if info.is_main:
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(container))
        # What made this run (versions, command line, the checkpoint resumed from).
        write_json_atomic(run_dir / "provenance.json", provenance(settings.resume))

    trainer = Trainer(
        settings,
        model,
        optimizer_factory,
        train_ds,
        val_ds,
        train_collate,
        samples,
        run_dir,
        info,
        logger=logger,
        metadata=metadata,
    )
    result = trainer.fit()
    # Rank 0's work after training (the feature reference: ~5 s of CPU per subject at BraTS
    # size, plots) must not hold the other ranks in a collective: a barrier after it would pass
    # the process group's timeout (1800 s) at a few hundred subjects and abort the job.
    barrier(info)
    if not info.is_main:
        return result
    if bool(cfg.get("feature_reference", True)):
        add_feature_reference(
            run_dir / "checkpoints" / "best.pt",
            [*train_records, *val_records],
            prep,
            info.device,
        )
    from aad_med.plots.training import plot_loss_curve, plot_reconstructions

    plot_loss_curve(result.history, run_dir / "loss_curve.png")
    pair = trainer.sample_reconstructions(3)
    if pair is not None:
        plot_reconstructions(*pair, run_dir / "reconstructions.png", channels=prep.channels)
    log.info(
        "done: %d epoch(s), best loss %.5g; checkpoints in %s",
        len(result.history),
        result.best_loss,
        run_dir / "checkpoints",
    )
    return result


def add_feature_reference(
    checkpoint: str | Path, records: list[SubjectRecord], prep, device="cpu"
) -> dict | None:
    """Store the fixed feature scale in ``checkpoint`` (``feature_reference``).

    One evaluation-grid embedding pass of the checkpoint's model over the encoder's training and
    validation subjects fits every block's centre and scale
    (:func:`aad_med.embedding.standardize.reference_from_subjects`); ``aad-compare`` then maps
    each subject with it, so a pair's AAD does not depend on the other cohorts of a call. The
    checkpoint is rewritten atomically (plain lists of floats, ``weights_only``-safe).

    Returns:
        The reference, or ``None`` when there are fewer than 2 subjects or no checkpoint.
    """
    from aad_med.data.records import Cohort
    from aad_med.embedding.standardize import reference_from_subjects
    from aad_med.training.checkpoint import load_model_from_checkpoint, save_checkpoint

    checkpoint = Path(checkpoint)
    if len(records) < 2 or not checkpoint.is_file():
        log.warning("no feature reference stored: fewer than 2 subjects or no %s", checkpoint)
        return None
    model, preprocessing, ckpt = load_model_from_checkpoint(checkpoint, device)
    cohort = Cohort(path=checkpoint.parent, layout="training", subjects=list(records))
    try:
        reference = reference_from_subjects(model, cohort, preprocessing, device)
    except (ValueError, RuntimeError) as e:
        # The training itself succeeded; aad-compare falls back to embedding.reference or the
        # pooled scale (and says so in distances.json).
        log.warning("no feature reference stored in %s: %s", checkpoint, e)
        return None
    ckpt["feature_reference"] = reference
    save_checkpoint(checkpoint, ckpt)
    log.info(
        "feature reference of %d subjects (%d blocks) stored in %s",
        reference["n_subjects"],
        len(reference["blocks"]),
        checkpoint,
    )
    return reference
