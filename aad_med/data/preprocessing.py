"""The preprocessing contract shared by training, embedding and checkpoints: what was done to the
images before they reached the autoencoder. Recorded in every checkpoint so comparison never
guesses. No file is read here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from aad_med import CHANNELS
from aad_med.errors import ConfigError


@dataclass(frozen=True)
class PreprocessingConfig:
    """How volumes become patches.

    Args:
        channels: channel order of the 4-channel input.
        spacing: target voxel spacing in mm (resampling); BraTS already is 1 mm.
        patch_size: edge of the cubic patches fed to the autoencoder.
        normalization: ``"zscore_nonzero"``: per-channel z-score over non-zero (brain) voxels.
        crop_foreground: crop each subject to the brain bounding box.
        min_brain_fraction: patches with less brain than this are not used.
        eval_stride: step of the deterministic evaluation grid; ``None`` means ``patch_size``.
    """

    channels: tuple[str, ...] = CHANNELS
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    patch_size: int = 32
    normalization: str = "zscore_nonzero"
    crop_foreground: bool = True
    min_brain_fraction: float = 0.25
    eval_stride: int | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if tuple(self.channels) != CHANNELS:
            raise ConfigError(f"channels must be {list(CHANNELS)}, got {list(self.channels)}")
        if self.patch_size < 4:
            raise ConfigError(f"patch_size must be >= 4, got {self.patch_size}")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise ConfigError(f"spacing must be three positive numbers, got {self.spacing}")
        if not 0.0 <= self.min_brain_fraction <= 1.0:
            raise ConfigError(f"min_brain_fraction must be in [0, 1], got {self.min_brain_fraction}")
        if self.normalization != "zscore_nonzero":
            raise ConfigError(f"unknown normalization {self.normalization!r}")

    @property
    def stride(self) -> int:
        return self.eval_stride or self.patch_size

    def to_dict(self) -> dict:
        """Primitives only (lists, floats, str): safe for ``torch.load(weights_only=True)``."""
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["spacing"] = [float(s) for s in self.spacing]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessingConfig:
        d = dict(d)
        d["channels"] = tuple(d.get("channels", CHANNELS))
        d["spacing"] = tuple(float(s) for s in d.get("spacing", (1.0, 1.0, 1.0)))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})
