"""Stage 3, training: checkpoints as plain dicts of tensors and primitives, written atomically and
loaded only with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue a run exactly (model, optimizer, scheduler,
epoch, step, RNG states) and to use the model without guessing (``model_config``,
``preprocessing``, training subject IDs, cohort paths). Nothing here trains or reads images.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.errors import CheckpointError, ConfigError
from aad_med.io_utils import atomic_path

CHECKPOINT_FORMAT = "aad-med-checkpoint"
FORMAT_VERSION = 1
"""Bumped whenever a key changes meaning; loading refuses newer versions."""

REQUIRED_KEYS = ("format", "format_version", "model_state", "model_config", "preprocessing")


def to_primitive(obj: Any) -> Any:
    """Convert ``obj`` to tensors and primitives only, the types ``weights_only`` loading accepts.

    numpy scalars become Python numbers, numpy arrays become tensors, tuples and sets become
    lists, paths become strings, mapping keys become strings.

    Raises:
        TypeError: an object that has no primitive form (it would need pickle to load).
    """
    if obj is None or isinstance(obj, torch.Tensor) or type(obj) in (bool, int, float, str):
        return obj
    # Subclasses (torch's TorchVersion is a str, IntEnum an int) would need pickle to load.
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, int) else k: to_primitive(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_primitive(v) for v in obj]
    raise TypeError(
        f"cannot store {type(obj).__name__} in a checkpoint (tensors and primitives only)"
    )


def capture_rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and every CUDA device) as primitives/tensors."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": [int(v) for v in py_state], "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the devices exist)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str | Path, state: Mapping) -> Path:
    """Write ``state`` atomically: temp file in the same folder, flush + fsync, rename, fsync folder.

    A crash at any point leaves either the previous file or the new one, never a torn file.

    Raises:
        TypeError: ``state`` holds something that is not a tensor or primitive.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = to_primitive(state)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(clean, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Atomically make ``dst`` a copy of ``src`` (hard link when possible, else a byte copy)."""
    src, dst = Path(src), Path(dst)
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
    return dst


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temp files left by a writer that was killed mid-write; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _unpickling_reason(e: Exception) -> str:
    """The informative line of torch's long weights_only error (e.g. the refused global)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            return ln.split("WeightsUnpickler error:", 1)[1].strip().split(". Please use")[0]
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (``weights_only=True``, onto the CPU) and check its format.

    Raises:
        CheckpointError: missing or unreadable file, a pickle payload or other non-primitive
            content ("not a safe aad-med checkpoint"), or not an aad-med checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        raise CheckpointError(
            f"{path}: not a safe aad-med checkpoint (refused by weights_only loading: {reason[:200]})"
        ) from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (file is not readable)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {reason[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an aad-med checkpoint (no '{CHECKPOINT_FORMAT}' marker)"
        )
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is newer than this aad-med "
            f"understands ({FORMAT_VERSION}); upgrade aad-med"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return ckpt


def load_model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, PreprocessingConfig, dict]:
    """Rebuild the trained autoencoder, in eval mode on ``device``, with its preprocessing.

    Returns:
        ``(model, preprocessing, ckpt)``; ``ckpt`` also holds ``train_subject_ids`` and
        ``cohorts`` for leakage warnings.

    Raises:
        CheckpointError: unsafe or unreadable file, weights that do not fit the recorded model,
            or a recorded preprocessing the model cannot take (patch size, channels); the line
            names the checkpoint.
    """
    from aad_med.embedding.encode import check_model_matches
    from aad_med.models import build_model

    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt["model_config"])
        model.load_state_dict(ckpt["model_state"])
        preprocessing = PreprocessingConfig.from_dict(ckpt["preprocessing"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: invalid preprocessing record ({e})") from None
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: model cannot be rebuilt from checkpoint ({first[:200]})"
        ) from None
    try:
        check_model_matches(model, preprocessing)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.to(device).eval()
    return model, preprocessing, ckpt
