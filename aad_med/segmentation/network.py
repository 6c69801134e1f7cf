"""Segmentation stage: the segmentation network, a MONAI ``UNet`` or ``SegResNet`` behind one
small wrapper so the project's training loop and checkpoints can hold it.

The wrapper exposes ``forward(x) -> logits`` (one channel per region, sigmoid multi-label as in
the BraTS challenge) and ``model_config()`` (primitives; the checkpoint records it, so
:func:`load_segmenter` rebuilds the same network). Nothing here reads images or trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aad_med.errors import CheckpointError, ConfigError
from aad_med.segmentation.regions import REGIONS, resolve_regions

ARCHITECTURES = ("unet", "segresnet")


@dataclass(frozen=True)
class SegmenterConfig:
    """The network: architecture and sizes (MONAI argument names).

    Args:
        architecture: ``"unet"`` (:class:`monai.networks.nets.UNet`) or ``"segresnet"``
            (:class:`monai.networks.nets.SegResNet`).
        regions: output channels, from :data:`~aad_med.segmentation.regions.REGIONS`.
        channels: UNet feature channels per level.
        strides: UNet down-sampling strides (one fewer than ``channels``).
        num_res_units: UNet residual units per block.
        init_filters: SegResNet filters of the first level.
        dropout: dropout probability.
        in_channels: image channels (t1, t1ce, t2, flair).
    """

    architecture: str = "unet"
    regions: tuple[str, ...] = REGIONS
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    init_filters: int = 8
    dropout: float = 0.0
    in_channels: int = 4

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise lists from configs once, here
        set_(self, "architecture", str(self.architecture).lower())
        set_(self, "regions", resolve_regions(self.regions))
        set_(self, "channels", tuple(int(c) for c in self.channels))
        set_(self, "strides", tuple(int(s) for s in self.strides))
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"segmenter.architecture must be one of {list(ARCHITECTURES)}, "
                f"got {self.architecture!r}"
            )
        if self.architecture == "unet" and len(self.strides) != len(self.channels) - 1:
            raise ConfigError(
                f"segmenter.strides needs one entry fewer than segmenter.channels, got "
                f"{list(self.strides)} for {list(self.channels)}"
            )
        if self.architecture == "segresnet" and (self.init_filters < 8 or self.init_filters % 8):
            # SegResNet normalises with GroupNorm(8 groups)
            raise ConfigError(
                f"segmenter.init_filters must be a multiple of 8 for segresnet, "
                f"got {self.init_filters}"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"segmenter.dropout must be in [0, 1), got {self.dropout}")

    @property
    def divisor(self) -> int:
        """Patch edges must be multiples of this (the network's total down-sampling)."""
        if self.architecture == "segresnet":
            return 8  # blocks_down=(1, 2, 2, 4): three halvings
        d = 1
        for s in self.strides:
            d *= s
        return d

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping) -> SegmenterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            **{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        )


class Segmenter(nn.Module):
    """A MONAI segmentation network with the project's model interface.

    ``forward(x)`` takes ``(B, 4, p, p, p)`` images and returns ``(B, R, p, p, p)`` logits, one
    channel per region of ``config.regions``.
    """

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        self.config = config
        out = len(config.regions)
        if config.architecture == "unet":
            from monai.networks.nets import UNet

            self.net = UNet(
                spatial_dims=3,
                in_channels=config.in_channels,
                out_channels=out,
                channels=config.channels,
                strides=config.strides,
                num_res_units=config.num_res_units,
                norm="instance",
                dropout=config.dropout,
            )
        else:
            from monai.networks.nets import SegResNet

            self.net = SegResNet(
                spatial_dims=3,
                in_channels=config.in_channels,
                out_channels=out,
                init_filters=config.init_filters,
                dropout_prob=config.dropout or None,
            )

    @property
    def regions(self) -> tuple[str, ...]:
        return self.config.regions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def model_config(self) -> dict:
        """Primitives that rebuild this network (:meth:`SegmenterConfig.from_dict`)."""
        return {"kind": "segmenter", **self.config.to_dict()}


def build_segmenter(config: SegmenterConfig | Mapping) -> Segmenter:
    """A fresh :class:`Segmenter` from a config (or its ``to_dict()``)."""
    if not isinstance(config, SegmenterConfig):
        config = SegmenterConfig.from_dict(config)
    return Segmenter(config)


def check_patch_size(config: SegmenterConfig, patch_size: int) -> None:
    """Raise :class:`ConfigError` when ``patch_size`` does not fit the network's down-sampling."""
    if patch_size < config.divisor or patch_size % config.divisor:
        raise ConfigError(
            f"segmenter.patch_size={patch_size} must be a multiple of {config.divisor} "
            f"(the {config.architecture}'s down-sampling)"
        )


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """Rebuild a trained segmenter (eval mode, on ``device``) from its checkpoint.

    Returns:
        ``(segmenter, checkpoint dict)``; the dict holds ``preprocessing``, ``label_convention``
        and the training subject IDs.

    Raises:
        CheckpointError: unsafe or unreadable file, or not a segmenter checkpoint.
    """
    from aad_med.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    cfg = dict(ckpt["model_config"])
    if cfg.pop("kind", None) != "segmenter":
        raise CheckpointError(f"{path}: not a segmenter checkpoint (an autoencoder's?)")
    try:
        model = build_segmenter(cfg)
        model.load_state_dict(ckpt["model_state"])
    except (ConfigError, RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: segmenter cannot be rebuilt ({first[:200]})") from None
    return model.to(device).eval(), ckpt


__all__: Sequence[str] = (
    "ARCHITECTURES",
    "Segmenter",
    "SegmenterConfig",
    "build_segmenter",
    "check_patch_size",
    "load_segmenter",
)
