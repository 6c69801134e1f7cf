"""Stage 3, training: the plain-PyTorch training loop (no Lightning).

Reconstruction loss (MSE or L1, optionally on brain voxels only) plus a KL term for the
variational model, AdamW (or any optimizer factory), linear warm-up then cosine decay,
gradient clipping, validation on held-out subjects, ``last.pt`` every epoch and ``best.pt`` on
improvement, optional early stopping. On CUDA: bf16 autocast, ``cudnn.benchmark``, optional
``channels_last_3d`` and ``torch.compile``. DDP when launched by torchrun.

Exact resume: every source of randomness is reseeded from ``(seed, epoch, rank)`` at the start
of each epoch (data order, patch sampling and augmentation in
:class:`~aad_med.data.datasets.PatchDataset`, dropout and VAE sampling), and model, optimizer,
scheduler and counters are restored from the checkpoint, so stopping after any epoch and
resuming gives bitwise the same weights on CPU as an uninterrupted run.

Configuration arrives as plain objects (:class:`TrainSettings`, a model, an optimizer factory,
datasets); this module reads no config files and no images itself.

Size: the Trainer is one state machine (epochs, checkpoints, exact resume, divergence, DDP) that
the segmentation trainer subclasses; its helpers stay beside it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from aad_med.errors import AADError, CheckpointError, ConfigError
from aad_med.training.checkpoint import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    RESUME_ALLOW_KEY,
    capture_rng_state,
    check_resume_compatible,
    copy_checkpoint,
    load_checkpoint,
    merged_training_record,
    remove_stale_temp_files,
    restore_rng_state,
    save_checkpoint,
)
from aad_med.training.distributed import DistInfo, all_reduce_sum
from aad_med.training.loggers import NullLogger

log = logging.getLogger("aad_med.train")

LOSSES = ("mse", "l1")
PRECISIONS = ("auto", "fp32", "bf16")


class NonFiniteLossError(AADError):
    """The training loss became NaN or Inf; the run stopped, the last good checkpoint is kept."""


@dataclass
class TrainSettings:
    """Everything the loop needs besides the model and the data.

    Args:
        max_epochs: epochs to train in total (a resumed run continues up to this).
        batch_size: patches per optimizer step, summed over all processes (global batch).
        seed: seed of every random choice.
        loss: ``"mse"`` or ``"l1"``.
        brain_only: average the reconstruction error over brain voxels only.
        kl_weight: weight of the KL term (variational model only).
        grad_clip: max gradient norm; ``None`` or 0 disables clipping.
        warmup_epochs: linear warm-up length (may be fractional); then cosine decay.
        min_lr_ratio: final learning rate as a fraction of the initial one.
        early_stopping_patience: stop after this many epochs without validation improvement;
            ``None`` disables early stopping.
        min_delta: smallest decrease of the monitored loss that counts as improvement.
        num_workers: DataLoader worker processes.
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPU), ``"fp32"`` or ``"bf16"`` (CUDA only).
        channels_last_3d: use the ``channels_last_3d`` memory format on CUDA.
        compile: wrap the model in ``torch.compile``.
        cudnn_benchmark: let cuDNN pick the fastest convolution algorithms (CUDA).
        progress: ``"auto"`` (tqdm bars when stderr is a terminal), ``True`` or ``False``.
        log_every_n_steps: step interval of scalar logging.
        resume: checkpoint to continue from, or ``None``.
        epochs_per_run: stop after this many epochs in this invocation (e.g. to fit a cluster
            time limit) and continue later with ``resume``; ``None`` runs to ``max_epochs``.
    """

    max_epochs: int = 10
    batch_size: int = 16
    seed: int = 0
    loss: str = "mse"
    brain_only: bool = False
    kl_weight: float = 0.0
    grad_clip: float | None = 1.0
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0
    early_stopping_patience: int | None = None
    min_delta: float = 0.0
    num_workers: int = 0
    precision: str = "auto"
    channels_last_3d: bool = False
    compile: bool = False
    cudnn_benchmark: bool = True
    progress: str | bool = "auto"
    log_every_n_steps: int = 10
    resume: str | None = None
    epochs_per_run: int | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"trainer.precision must be one of {list(PRECISIONS)}, got {self.precision!r}"
            )
        if self.max_epochs < 1:
            raise ConfigError(f"trainer.max_epochs must be >= 1, got {self.max_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"trainer.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class FitResult:
    """What a finished run produced."""

    history: list[dict]
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_loss: float
    stopped_early: bool = False
    epochs_run: int = 0
    extra: dict = field(default_factory=dict)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the global RNGs for one epoch of one process (independent of history)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank), 7]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda_factory(
    total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: linear warm-up, then cosine decay."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def reconstruction_loss(
    x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared (or absolute) error, in float32, over all voxels or the voxels of ``mask``.

    With a mask, each patch's error is averaged over its own brain voxels and the patches are
    then averaged, so every patch weighs the same and the mean over processes of per-process
    losses equals the loss of the whole global batch (DDP gives the single-process result).

    Args:
        x_hat: reconstruction ``(B, C, ...)``.
        x: target of the same shape.
        kind: ``"mse"`` or ``"l1"``.
        mask: ``(B, 1, ...)`` brain mask (non-zero = brain) or ``None``.
    """
    diff = x_hat.float() - x.float()
    err = diff.square() if kind == "mse" else diff.abs()
    if mask is None:
        return err.mean()
    m = (mask > 0).to(err.dtype)
    dims = tuple(range(1, err.ndim))
    per_patch = (err * m).sum(dim=dims) / (m.sum(dim=dims) * err.shape[1]).clamp_min(1.0)
    return per_patch.mean()


def _rebatch(loader: Iterable[Mapping], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup the loader's subject batches into batches of exactly ``size`` patches (the last
    one may be smaller), yielding ``(image, brain)``."""
    images: list[torch.Tensor] = []
    brains: list[torch.Tensor] = []
    pending = 0
    for batch in loader:
        images.append(batch["image"])
        brains.append(batch["brain"])
        pending += batch["image"].shape[0]
        while pending >= size:
            img, brn = torch.cat(images), torch.cat(brains)
            yield img[:size], brn[:size]
            images, brains = [img[size:]], [brn[size:]]
            pending -= size
    if pending:
        yield torch.cat(images), torch.cat(brains)


def _autocast(device: torch.device, bf16: bool):
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _use_progress(progress: str | bool, info: DistInfo) -> bool:
    if not info.is_main:
        return False
    if progress == "auto":
        return sys.stderr.isatty()
    return bool(progress)


def _display(vol: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(vol, [1, 99])
    return np.clip((vol - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


class Trainer:
    """Runs :func:`fit`; kept as a class so tests can reach the pieces.

    Args:
        settings: loop settings.
        model: the autoencoder (``forward(x, return_kl=True) -> (x_hat, kl)``,
            ``model_config()``), not yet moved to the device.
        optimizer_factory: ``params -> Optimizer`` (e.g. a Hydra ``_partial_`` AdamW).
        train_dataset: a patch dataset (items: lists of patch dicts, ``set_epoch``).
        val_dataset: held-out subjects' patch dataset, or ``None``.
        collate_fn: batches subjects' patch lists (``aad_med.data.datasets.train_collate``).
        samples_per_subject: patches each dataset item holds.
        run_dir: the run folder (``checkpoints/`` goes there).
        info: this process's place in the (possibly distributed) job.
        logger: experiment logger (rank 0), e.g. :class:`TensorBoardLogger`.
        metadata: primitives stored in every checkpoint (config, preprocessing, subject IDs,
            cohorts).
    """

    def __init__(
        self,
        settings: TrainSettings,
        model: nn.Module,
        optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        train_dataset: torch.utils.data.Dataset,
        val_dataset: torch.utils.data.Dataset | None,
        collate_fn: Callable,
        samples_per_subject: int,
        run_dir: str | Path,
        info: DistInfo,
        logger: NullLogger | None = None,
        metadata: Mapping | None = None,
    ):
        self.s = settings
        self.info = info
        self.device = info.device
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = logger or NullLogger()
        self.metadata = dict(metadata or {})
        self.samples_per_subject = int(samples_per_subject)
        self.collate_fn = collate_fn
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        if settings.batch_size % info.world_size:
            raise ConfigError(
                f"trainer.batch_size={settings.batch_size} (global) must be divisible by the "
                f"number of processes ({info.world_size})"
            )
        self.local_batch = settings.batch_size // info.world_size
        cuda = self.device.type == "cuda"
        if settings.precision == "bf16" and not cuda:
            raise ConfigError("trainer.precision=bf16 needs CUDA; use fp32 (or auto) on CPU")
        self.bf16 = cuda and settings.precision in ("auto", "bf16")
        self.channels_last = cuda and settings.channels_last_3d
        if cuda:
            torch.backends.cudnn.benchmark = bool(settings.cudnn_benchmark)

        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.model_config = model.model_config()
        self.optimizer = optimizer_factory(self.model.parameters())

        self.train_sampler = DistributedSampler(
            train_dataset,
            num_replicas=info.world_size,
            rank=info.rank,
            shuffle=True,
            seed=settings.seed,
            drop_last=False,
        )
        fetch = max(1, self.local_batch // self.samples_per_subject)
        self.train_loader = DataLoader(
            train_dataset,
            batch_size=fetch,
            sampler=self.train_sampler,
            collate_fn=collate_fn,
            num_workers=settings.num_workers,
            # Not pinned: _rebatch's torch.cat copies every batch into new pageable memory, so a
            # pinned batch buys nothing, and trainer.cache_on_device yields CUDA tensors, which
            # cannot be pinned (RuntimeError on the first batch).
            pin_memory=False,
            persistent_workers=False,
        )
        self.val_loader = None
        if val_dataset is not None and len(val_dataset) > 0:
            val_sampler = DistributedSampler(
                val_dataset,
                num_replicas=info.world_size,
                rank=info.rank,
                shuffle=False,
                drop_last=False,
            )
            self.val_loader = DataLoader(
                val_dataset,
                batch_size=fetch,
                sampler=val_sampler,
                collate_fn=collate_fn,
                num_workers=settings.num_workers,
                pin_memory=False,  # as the training loader's
            )
        local_patches = len(self.train_sampler) * self.samples_per_subject
        self.steps_per_epoch = max(1, math.ceil(local_patches / self.local_batch))
        total = self.steps_per_epoch * settings.max_epochs
        warmup = int(round(settings.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(total, min(warmup, total), settings.min_lr_ratio)
        )
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.best_loss = math.inf
        self.epochs_since_best = 0
        self.net: nn.Module = self.model

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The checkpoint dict of the current state (tensors and primitives only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "step": self.step,
            "model_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "history": self.history,
            "best_loss": self.best_loss,
            "epochs_since_best": self.epochs_since_best,
            "model_config": self.model_config,
            "world_size": self.info.world_size,
            "batch_size": self.s.batch_size,
            "seed": self.s.seed,
            **self.metadata,
        }

    def load_state(self, path: str | Path) -> None:
        """Continue from a checkpoint written by :meth:`state_dict`.

        Raises:
            CheckpointError: unsafe/unreadable file, or a model that differs from the config.
        """
        ckpt = load_checkpoint(path)
        config = self.metadata.get("config")
        if config is not None:
            changes = check_resume_compatible(path, ckpt, config, self.metadata)
            if changes:
                log.warning(
                    "resuming %s despite changes (%s=true): %s; the checkpoint records them "
                    "and every subject trained on",
                    path,
                    RESUME_ALLOW_KEY,
                    "; ".join(changes),
                )
                self.metadata = merged_training_record(ckpt, self.metadata, changes)
            elif "resume_history" in ckpt:
                self.metadata = merged_training_record(ckpt, self.metadata, [])
        if ckpt["model_config"] != self.model_config:
            raise CheckpointError(
                f"{path}: checkpoint model {ckpt['model_config']} differs from the configured "
                f"model {self.model_config}; resume with the run's own config"
            )
        for key in ("optimizer_state", "scheduler_state", "epoch", "step"):
            if key not in ckpt:
                raise CheckpointError(f"{path}: checkpoint lacks {key}; it cannot be resumed")
        self.model.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scheduler.load_state_dict(ckpt["scheduler_state"])
        self.epoch = int(ckpt["epoch"])
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
        self.best_loss = float(ckpt.get("best_loss", math.inf))
        self.epochs_since_best = int(ckpt.get("epochs_since_best", 0))
        if "rng" in ckpt:
            restore_rng_state(ckpt["rng"])
        if ckpt.get("batch_size") not in (None, self.s.batch_size):
            log.warning(
                "resuming with trainer.batch_size=%s, the checkpoint used %s: the run will not "
                "repeat an uninterrupted one exactly",
                self.s.batch_size,
                ckpt.get("batch_size"),
            )
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.step)

    def _save(self, improved: bool) -> None:
        if not self.info.is_main:
            return
        last = save_checkpoint(self.ckpt_dir / "last.pt", self.state_dict())
        if improved or not (self.ckpt_dir / "best.pt").exists():
            copy_checkpoint(last, self.ckpt_dir / "best.pt")

    def _discard_unresumable_run(self) -> None:
        """After a divergence before any checkpoint exists, remove what the run wrote (its
        config.yaml, empty ``checkpoints/``, TensorBoard events): left behind, they would make
        the folder look like results that ``trainer.resume=.../last.pt`` could continue."""
        self.logger.close()
        if not self.info.is_main or (self.ckpt_dir / "last.pt").exists():
            return
        from aad_med.pipelines.rundir import remove_results

        remove_results(self.run_dir)
        with contextlib.suppress(OSError):
            self.ckpt_dir.rmdir()

    # -- one epoch ---------------------------------------------------------------------------

    def _forward(self, x: torch.Tensor, brain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _autocast(self.device, self.bf16):
            x_hat, kl = self.net(x, return_kl=True)
        rec = reconstruction_loss(x_hat, x, self.s.loss, brain if self.s.brain_only else None)
        return rec, kl.float()

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def _count(self, n: int) -> torch.Tensor:
        return torch.tensor(float(n), dtype=torch.float64, device=self.device)

    def _check_finite(self, loss_sum: torch.Tensor) -> None:
        value = float(loss_sum.item())
        if math.isfinite(value):
            return
        last = self.ckpt_dir / "last.pt"
        kept = (
            f"the last good checkpoint is {last} (epoch {self.epoch})"
            if last.exists()
            else "no epoch finished, so no checkpoint was written and there is nothing to "
            "resume (the files this run wrote in its folder are removed)"
        )
        raise NonFiniteLossError(
            f"training loss became {value} at epoch {self.epoch + 1}, step {self.step + 1}; "
            f"stopped, {kept}. Lower optim.optimizer.lr, keep optim.grad_clip on, or check the "
            "input data for NaN/Inf"
        )

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the training subjects; returns ``(mean loss, patches per second)``."""
        s, info = self.s, self.info
        seed_everything(epoch_seed(s.seed, self.epoch, info.rank))
        self.train_sampler.set_epoch(self.epoch)
        if hasattr(self.train_dataset, "set_epoch"):
            self.train_dataset.set_epoch(self.epoch)
        self.net.train()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        bar = None
        if _use_progress(s.progress, info):
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {self.epoch + 1}/{s.max_epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
            )
        start = time.perf_counter()
        patches = 0
        for x, brain in _rebatch(self.train_loader, self.local_batch):
            x, brain = self._to_device(x), brain.to(self.device, non_blocking=True)
            rec, kl = self._forward(x, brain)
            loss = rec + s.kl_weight * kl if s.kl_weight else rec
            n = x.shape[0]
            step_sum = all_reduce_sum(
                torch.stack([loss.detach().double() * n, self._count(n)]),
                info,
            )
            self._check_finite(step_sum[0])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                nn.utils.clip_grad_norm_(self.net.parameters(), s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            totals += step_sum
            patches += int(step_sum[1].item())
            rate = patches / max(time.perf_counter() - start, 1e-9)
            step_loss = float(step_sum[0] / step_sum[1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4g}", patches_per_s=f"{rate:.1f}")
            if info.is_main and self.step % max(1, s.log_every_n_steps) == 0:
                self.logger.log_scalars(
                    {
                        "train/loss_step": step_loss,
                        "train/lr": self.scheduler.get_last_lr()[0],
                        "train/patches_per_s": rate,
                    },
                    self.step,
                )
        if bar is not None:
            bar.close()
        elapsed = max(time.perf_counter() - start, 1e-9)
        return float(totals[0] / totals[1].clamp_min(1)), float(totals[1]) / elapsed

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean reconstruction loss on the validation subjects (fixed patches), or ``None``."""
        if self.val_loader is None:
            return None
        if hasattr(self.val_dataset, "set_epoch"):
            self.val_dataset.set_epoch(0)
        self.net.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, brain in _rebatch(self.val_loader, self.local_batch):
            x, brain = self._to_device(x), brain.to(self.device, non_blocking=True)
            rec, _ = self._forward(x, brain)
            totals += torch.stack([rec.double() * x.shape[0], self._count(x.shape[0])])
        totals = all_reduce_sum(totals, self.info)
        return float(totals[0] / totals[1].clamp_min(1))

    @torch.no_grad()
    def sample_reconstructions(self, n: int = 3) -> tuple[np.ndarray, np.ndarray] | None:
        """Input and reconstruction of the first ``n`` validation (else training) patches."""
        dataset = self.val_dataset if self.val_loader is not None else self.train_dataset
        if dataset is None or len(dataset) == 0:
            return None
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(0)
        x = self.collate_fn([dataset[0]])["image"][:n]
        self.model.eval()
        with _autocast(self.device, self.bf16):
            x_hat = self.model(self._to_device(x))
        # The collated patches are on the GPU with trainer.cache_on_device.
        return x.float().cpu().numpy(), x_hat.float().cpu().numpy()

    def _log_images(self) -> None:
        if not (self.info.is_main and self.logger.log_images_enabled):
            return
        pair = self.sample_reconstructions(1)
        if pair is None:
            return
        x, x_hat = pair
        from aad_med import CHANNELS
        from aad_med.plots.training import mid_slice

        images = {}
        for c in range(x.shape[1]):
            a, b = mid_slice(x[0, c]), mid_slice(x_hat[0, c])
            name = CHANNELS[c] if c < len(CHANNELS) else f"ch{c}"
            images[f"reconstruction/{name}"] = _display(np.concatenate([a, b], axis=0)).T
        self.logger.log_images(images, self.step)

    # -- the run -----------------------------------------------------------------------------

    def fit(self) -> FitResult:
        """Train until ``max_epochs`` (or early stopping); returns the history and checkpoints.

        Raises:
            NonFiniteLossError: the loss became NaN/Inf (``last.pt`` is left as it was).
            CheckpointError: ``resume`` points at an unusable checkpoint.
        """
        s, info = self.s, self.info
        if info.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.ckpt_dir)
        if s.resume:
            self.load_state(s.resume)
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DDP(self.model, device_ids=ids)
        if s.compile:
            self.net = torch.compile(self.net)
        stopped_early = False
        epochs_run = 0
        if self.epoch >= s.max_epochs:
            log.info(
                "checkpoint is already at epoch %d of %d: nothing to do", self.epoch, s.max_epochs
            )
        stop_at = s.max_epochs
        if s.epochs_per_run:
            stop_at = min(s.max_epochs, self.epoch + int(s.epochs_per_run))
        while self.epoch < stop_at:
            t0 = time.perf_counter()
            try:
                train_loss, rate = self.train_epoch()
            except NonFiniteLossError:
                self._discard_unresumable_run()
                raise
            val_loss = self.validate()
            monitored = val_loss if val_loss is not None else train_loss
            improved = monitored < self.best_loss - s.min_delta
            if improved:
                self.best_loss = monitored
                self.epochs_since_best = 0
            else:
                self.epochs_since_best += 1
            self.epoch += 1
            epochs_run += 1
            lr = self.scheduler.get_last_lr()[0]
            self.history.append(
                {
                    "epoch": self.epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "lr": lr,
                    "patches_per_s": rate,
                    "seconds": time.perf_counter() - t0,
                }
            )
            self._save(improved)
            if info.is_main:
                scalars = {
                    "epoch/train_loss": train_loss,
                    "epoch/lr": lr,
                    "epoch/patches_per_s": rate,
                }
                if val_loss is not None:
                    scalars["epoch/val_loss"] = val_loss
                self.logger.log_scalars(scalars, self.step)
                self._log_images()
                val_txt = "n/a" if val_loss is None else f"{val_loss:.5g}"
                log.info(
                    "epoch %d/%d  train_loss %.5g  val_loss %s  lr %.3g  %.1f patches/s  %.1fs%s",
                    self.epoch,
                    s.max_epochs,
                    train_loss,
                    val_txt,
                    lr,
                    rate,
                    self.history[-1]["seconds"],
                    "  (best)" if improved else "",
                )
            patience = s.early_stopping_patience
            if patience and self.epochs_since_best >= patience and self.epoch < s.max_epochs:
                log.info("early stopping: no improvement for %d epochs", patience)
                stopped_early = True
                break
        self.logger.close()
        last = self.ckpt_dir / "last.pt"
        best = self.ckpt_dir / "best.pt"
        return FitResult(
            history=self.history,
            last_checkpoint=last if last.exists() else None,
            best_checkpoint=best if best.exists() else None,
            best_loss=self.best_loss,
            stopped_early=stopped_early,
            epochs_run=epochs_run,
        )
