"""The one device resolver: ``auto``/``cpu``/``cuda``/``cuda:N`` (or a ``torch.device``) to a
``torch.device``, used by training, embedding, calibration and every command.

Under torchrun each process takes its own GPU: plain ``cuda`` (and ``auto`` with a GPU) means
``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os

import torch

from aad_med.errors import ConfigError


def resolve_device(
    preference: str | torch.device | None = "auto",
    local_rank: int | None = None,
    key: str = "device",
) -> torch.device:
    """``auto``/``None`` -> this process's GPU when one is visible, else ``cpu``.

    Args:
        preference: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``.
        local_rank: the GPU index plain ``cuda`` means (default: ``LOCAL_RANK``, else 0).
        key: the config key named in error messages (``trainer.device`` in training).

    Raises:
        ConfigError: ``cuda`` requested where no GPU is visible, ``cuda:N`` in a process of a
            torchrun job (every rank would take GPU N), or an unknown value.
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    preference = "auto" if preference is None else str(preference).lower()
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if preference != "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"{key}={preference} under torchrun would put every process on one GPU; use "
                f"{key}=cuda (each process takes cuda:LOCAL_RANK) and choose the GPUs with "
                "CUDA_VISIBLE_DEVICES"
            )
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}=cuda but no CUDA GPU is visible; use {key}=cpu or auto")
        if preference == "cuda":
            rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device(preference)
    raise ConfigError(f"{key} must be auto, cpu or cuda, got {preference!r}")
