"""Segmentation stage: training a :class:`~aad_med.segmentation.network.Segmenter` with the
project's own loop.

:class:`SegmentationTrainer` is :class:`aad_med.training.loop.Trainer` with a segmentation loss
(MONAI ``DiceCELoss``, sigmoid multi-label over the regions) in place of the reconstruction loss.
Everything else is the loop's: tumour-aware random patches from
:func:`aad_med.data.datasets.build_train_dataset` (MONAI cache), per-epoch reseeding (exact
resume), atomic ``last.pt``/``best.pt``, bf16 autocast on CUDA, tqdm and TensorBoard scalars.
The loop hands a batch's second tensor to the loss as the brain mask; here
:class:`RegionCollate` puts the region targets there instead.

Reads images only through the data stage; writes only into ``run_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aad_med.data.datasets import build_train_dataset, train_collate
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.errors import ConfigError
from aad_med.segmentation.network import Segmenter, SegmenterConfig, check_patch_size
from aad_med.segmentation.regions import region_masks
from aad_med.training.distributed import DistInfo, resolve_device
from aad_med.training.loggers import NullLogger
from aad_med.training.loop import FitResult, Trainer, TrainSettings, _autocast, seed_everything

log = logging.getLogger("aad_med.segmentation")


@dataclass
class SegmentationSettings:
    """How the segmenter is trained and scored (the ``segmenter`` config group).

    Args:
        network: architecture and sizes.
        patch_size: edge of the cubic training patches and of the sliding window.
        max_epochs: training epochs.
        batch_size: patches per optimizer step.
        samples_per_subject: patches drawn from each training subject per epoch.
        lr: AdamW learning rate; ``weight_decay`` its weight decay.
        tumour_ratio: share of patches centred on tumour voxels.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto`` (bf16 on CUDA), ``fp32`` or ``bf16``.
        cache: dataset cache (``memory``, ``disk`` or ``none``).
        num_workers: DataLoader workers.
        test_fraction: share of the source subjects held out for testing (at least one).
        sw_batch_size: windows per forward pass in sliding-window inference.
        sw_overlap: overlap of the sliding windows.
        hd95: also compute the 95th percentile Hausdorff distance (slower).
        score_region: the region whose Dice is the score related to the distances.
        progress: tqdm bars (``auto``: when stderr is a terminal).
        tensorboard: write TensorBoard events into ``run_dir/tensorboard``.
        resume: a ``last.pt`` to continue training from (with the same ``max_epochs``).
        epochs_per_run: stop after this many epochs in this call (continue with ``resume``).
        seed: seed of the split, the patches and the weights.
    """

    network: SegmenterConfig = field(default_factory=SegmenterConfig)
    patch_size: int = 32
    max_epochs: int = 10
    batch_size: int = 4
    samples_per_subject: int = 4
    lr: float = 1e-2
    weight_decay: float = 1e-5
    tumour_ratio: float = 0.5
    device: str = "auto"
    precision: str = "auto"
    cache: str = "memory"
    num_workers: int = 0
    test_fraction: float = 0.25
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    hd95: bool = False
    score_region: str = "WT"
    progress: str | bool = "auto"
    tensorboard: bool = False
    resume: str | None = None
    epochs_per_run: int | None = None
    seed: int = 0

    def __post_init__(self):
        self.patch_size = int(self.patch_size)
        check_patch_size(self.network, self.patch_size)
        if self.score_region not in self.network.regions:
            raise ConfigError(
                f"segmenter.score_region={self.score_region!r} is not among "
                f"segmenter.regions={list(self.network.regions)}"
            )
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ConfigError(
                f"segmenter.test_fraction must be in (0, 1), got {self.test_fraction}"
            )
        device = str(self.device).lower()
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ConfigError(f"segmenter.device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 <= float(self.sw_overlap) < 1.0:
            raise ConfigError(f"segmenter.sw_overlap must be in [0, 1), got {self.sw_overlap}")

    @property
    def preprocessing(self) -> PreprocessingConfig:
        """The preprocessing of the segmenter's inputs (the project's, at its patch size)."""
        return PreprocessingConfig(patch_size=self.patch_size)


def device_for(preference: str, key: str = "segmenter.device") -> torch.device:
    """The project's device resolver, with errors naming ``key`` (the setting to change)."""
    try:
        try:
            return resolve_device(preference, key=key)  # a resolver that names the key itself
        except TypeError:
            return resolve_device(preference)
    except ConfigError as e:
        message = str(e).replace("trainer.device", key)
        raise ConfigError(message) from None


def split_train_test(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` subjects: at least one in each part.

    Raises:
        ConfigError: fewer than 2 subjects.
    """
    if n < 2:
        raise ConfigError(f"the source needs at least 2 subjects to train and test, got {n}")
    n_test = min(n - 1, max(1, int(round(n * float(test_fraction)))))
    order = np.random.default_rng([int(seed), 16]).permutation(n)
    return sorted(int(i) for i in order[n_test:]), sorted(int(i) for i in order[:n_test])


class RegionCollate:
    """Collate for segmentation: :func:`train_collate`, with the region targets (float masks,
    one channel per region) in the slot the loop passes on as ``brain``. A class so DataLoader
    workers can pickle it."""

    def __init__(self, regions: Sequence[str], convention: str = "brats"):
        self.regions = tuple(regions)
        self.convention = convention

    def __call__(self, batch) -> dict:
        out = train_collate(batch)
        out["brain"] = region_masks(out["seg"], self.regions, self.convention)
        return out


class SegmentationTrainer(Trainer):
    """The project's :class:`~aad_med.training.loop.Trainer` with a Dice + cross-entropy loss."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from monai.losses import DiceCELoss

        # sigmoid per region: WT, TC and ET overlap (they are nested), so not a softmax.
        self.loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def _forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(self.device, self.bf16):
            logits = self.net(x)
        loss = self.loss_fn(logits.float(), target.float())
        return loss, torch.zeros((), device=self.device)

    @torch.no_grad()
    def _log_images(self) -> None:
        if not (self.info.is_main and self.logger.log_images_enabled):
            return
        dataset = self.train_dataset
        if dataset is None or len(dataset) == 0:
            return
        dataset.set_epoch(0)
        batch = self.collate_fn([dataset[0]])
        self.model.eval()
        with _autocast(self.device, self.bf16):
            prob = torch.sigmoid(self.model(self._to_device(batch["image"][:1]))).float().cpu()
        from aad_med.plots.training import mid_slice

        flair = mid_slice(batch["image"][0, -1].numpy())
        lo, hi = float(flair.min()), float(flair.max())
        flair = (flair - lo) / (hi - lo if hi > lo else 1.0)
        images = {"segmentation/flair": flair.T}
        for c, region in enumerate(self.model.regions):
            truth = mid_slice(batch["brain"][0, c].numpy())
            pred = mid_slice(prob[0, c].numpy())
            images[f"segmentation/{region}_truth_vs_prediction"] = np.concatenate(
                [truth, pred], axis=0
            ).T
        self.logger.log_images(images, self.step)
        self.model.train()


def train_segmenter(
    records: Sequence[SubjectRecord],
    settings: SegmentationSettings,
    run_dir: str | Path,
    convention: str = "brats",
    metadata: dict | None = None,
) -> tuple[Segmenter, FitResult]:
    """Train a segmenter on ``records`` and leave its checkpoints in ``run_dir/checkpoints``.

    Args:
        records: training subjects (with segmentations).
        settings: network and training settings.
        run_dir: folder of ``checkpoints/`` (and ``tensorboard/``).
        convention: label convention of the segmentations (``brats`` or ``msd``).
        metadata: primitives stored in the checkpoints besides the defaults.

    Returns:
        ``(segmenter after the last epoch, in eval mode on its device; the loop's FitResult)``.

    Raises:
        ConfigError: no training subject has a segmentation, or inconsistent settings.
    """
    from aad_med.segmentation.network import build_segmenter

    labelled = [r for r in records if r.seg is not None]
    if not labelled:
        raise ConfigError("no training subject of the source has a segmentation (seg) file")
    device = device_for(settings.device)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    prep = settings.preprocessing
    dataset = build_train_dataset(
        labelled,
        prep,
        samples_per_subject=settings.samples_per_subject,
        cache=settings.cache,
        tumour_ratio=settings.tumour_ratio,
        seed=settings.seed,
    )
    seed_everything(settings.seed)
    model = build_segmenter(settings.network)
    loop = TrainSettings(
        max_epochs=int(settings.max_epochs),
        batch_size=int(settings.batch_size),
        seed=int(settings.seed),
        warmup_epochs=min(1.0, float(settings.max_epochs) / 4),
        num_workers=int(settings.num_workers),
        precision=settings.precision,
        progress=settings.progress,
        resume=settings.resume,
        epochs_per_run=settings.epochs_per_run,
    )
    logger = NullLogger()
    if settings.tensorboard:
        from aad_med.training.loggers import TensorBoardLogger

        logger = TensorBoardLogger(Path(run_dir) / "tensorboard")
    lr, wd = float(settings.lr), float(settings.weight_decay)
    trainer = SegmentationTrainer(
        loop,
        model,
        lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
        dataset,
        None,
        RegionCollate(settings.network.regions, convention),
        settings.samples_per_subject,
        run_dir,
        info,
        logger=logger,
        metadata={
            "preprocessing": prep.to_dict(),
            "label_convention": convention,
            "train_subject_ids": [r.subject_id for r in labelled],
            **(metadata or {}),
        },
    )
    result = trainer.fit()
    model.eval()
    return model, result
