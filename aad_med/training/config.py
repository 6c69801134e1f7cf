"""Stage 3, training: turning the composed Hydra config into plain objects for the loop.

One ``instantiate`` helper for every ``_target_`` node (errors become
:class:`~aad_med.errors.ConfigError` naming the config key), the training settings, the
preprocessing contract and the subject-level train/validation split. No files are read here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.errors import ConfigError
from aad_med.training.loop import TrainSettings


def instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node, **kwargs)`` with errors reported against ``key``.

    Raises:
        ConfigError: the target cannot be imported or rejects its arguments.
    """
    try:
        return _hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        text = str(cause).strip().splitlines()
        first = text[-1] if text else type(cause).__name__
        raise ConfigError(f"{key}: cannot build {node.get('_target_')!r}: {first}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None


def missing_keys(cfg: DictConfig) -> list[str]:
    """Mandatory (``???``) keys left unset, hydra's own node excluded."""
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return sorted(OmegaConf.missing_keys(body))


def settings_from_config(cfg: DictConfig) -> TrainSettings:
    """The loop settings from the ``trainer``, ``optim``, ``loss``, ``data`` and ``seed`` keys."""
    t, o, loss = cfg.trainer, cfg.optim, cfg.loss
    grad_clip = o.get("grad_clip")
    return TrainSettings(
        max_epochs=int(t.max_epochs),
        batch_size=int(t.batch_size),
        seed=int(cfg.seed),
        loss=str(loss.kind),
        brain_only=bool(loss.brain_only),
        kl_weight=float(loss.kl_weight) if cfg.model.get("variational") else 0.0,
        grad_clip=None if grad_clip in (None, 0) else float(grad_clip),
        warmup_epochs=float(o.get("warmup_epochs", 0.0)),
        min_lr_ratio=float(o.get("min_lr_ratio", 0.0)),
        early_stopping_patience=(
            None
            if t.get("early_stopping_patience") in (None, 0)
            else int(t.early_stopping_patience)
        ),
        min_delta=float(t.get("min_delta", 0.0)),
        num_workers=int(cfg.data.get("num_workers", 0)),
        precision=str(t.get("precision", "auto")),
        channels_last_3d=bool(t.get("channels_last_3d", False)),
        compile=bool(t.get("compile", False)),
        cudnn_benchmark=bool(t.get("cudnn_benchmark", True)),
        progress=t.get("progress", "auto"),
        log_every_n_steps=int(t.get("log_every_n_steps", 10)),
        resume=None if t.get("resume") in (None, "") else str(t.resume),
        epochs_per_run=(None if t.get("epochs_per_run") in (None, 0) else int(t.epochs_per_run)),
    )


def preprocessing_from_config(data: DictConfig) -> PreprocessingConfig:
    """The preprocessing contract recorded in checkpoints, from the ``data`` node."""
    return PreprocessingConfig.from_dict(
        {
            "patch_size": int(data.patch_size),
            "spacing": list(data.get("spacing", [1.0, 1.0, 1.0])),
            "crop_foreground": bool(data.get("crop_foreground", True)),
            "min_brain_fraction": float(data.get("min_brain_fraction", 0.25)),
        }
    )


def split_subjects(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded subject-level split: ``(train indices, validation indices)``, each sorted.

    At least one subject trains; with two or more subjects and ``val_fraction > 0`` at least
    one validates.

    Raises:
        ConfigError: ``val_fraction`` outside ``[0, 1)`` or no subjects.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if n < 1:
        raise ConfigError("no training subjects")
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    order = np.random.default_rng([int(seed), 1234]).permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def as_list(value: Any) -> list:
    """A config value as a plain list (``None`` -> ``[]``, a scalar -> ``[value]``)."""
    if value is None:
        return []
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str) or not isinstance(value, Sequence):
        return [value]
    return list(value)
