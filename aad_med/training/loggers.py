"""Stage 3, training: experiment loggers selected by the ``logger`` config group.

Two implementations with one small interface (``log_scalars``, ``log_images``, ``close``):
TensorBoard (``torch.utils.tensorboard.SummaryWriter``) and a no-op. Only rank 0 builds a real
one. Nothing here computes metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class NullLogger:
    """Logs nothing (``logger=none``)."""

    log_images_enabled = False

    def __init__(self, log_dir: str | Path | None = None, **_: object):
        self.log_dir = None if log_dir is None else Path(log_dir)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Record scalar values at a global step."""

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        """Record ``(H, W)`` images in ``[0, 1]`` at a global step."""

    def close(self) -> None:
        """Flush and release files."""


class TensorBoardLogger(NullLogger):
    """Scalars and reconstruction images in ``<run>/tensorboard`` (``logger=tensorboard``).

    Args:
        log_dir: event folder (created).
        log_images: also write reconstruction images each epoch.
        flush_secs: how often events reach the disk.
    """

    def __init__(self, log_dir: str | Path, log_images: bool = True, flush_secs: int = 30):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_images_enabled = bool(log_images)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), global_step=step)

    def log_images(self, images: dict[str, np.ndarray], step: int) -> None:
        if not self.log_images_enabled:
            return
        for tag, img in images.items():
            self.writer.add_image(
                tag, np.clip(img, 0, 1)[None], global_step=step, dataformats="CHW"
            )

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
