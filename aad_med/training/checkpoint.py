"""Stage 3, training: checkpoints as plain dicts of tensors and primitives, written atomically and
loaded only with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue a run exactly (model, optimizer, scheduler,
epoch, step, RNG states) and to use the model without guessing (``model_config``,
``preprocessing``, training subject IDs, cohort paths). Nothing here trains or reads images.

Size: everything the checkpoint format promises (atomic save, safe load, the preprocessing-record
check, the resume-compatibility check) is in one file, so no reader or writer of the format lives
elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.errors import CheckpointError, ConfigError
from aad_med.io_utils import atomic_path, checkpoint_path_problem  # re-exported here

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


def save_model_checkpoint(
    path: str | Path, model: torch.nn.Module, preprocessing: Mapping, **extra: object
) -> Path:
    """Save ``model`` alone (no optimiser or RNG state) in ``aad-train``'s checkpoint format, with
    ``preprocessing`` (a ``PreprocessingConfig.to_dict()``); ``extra`` adds further keys.

    For encoders built outside ``aad-train``: benchmark scripts and test factories.
    """
    return save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_state": model.state_dict(),
            "model_config": model.model_config(),
            "preprocessing": dict(preprocessing),
            **extra,
        },
    )


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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ADVICE = (
    "weights_only` set to `false",
    "weights_only=false",
    "re-running",
    "please use",
    "please file an issue",
    "check the documentation",
    "this file can still be loaded",
    "do those steps only",
    "we changed the default value",
    "alternatively, to load",
    "do it only if",
)


def _torch_reason(e: BaseException) -> str:
    """The informative part of a torch loading error, on one line, without torch's advice to
    load with ``weights_only=False`` (which would run whatever the file holds)."""
    text = _ANSI.sub("", str(e))
    if "WeightsUnpickler error:" in text:
        # The refused global or opcode follows the marker, sometimes on the next line.
        text = text.split("WeightsUnpickler error:", 1)[1]
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text)
    kept = [
        s.strip(" \t.")
        for s in sentences
        if s.strip(" \t.") and not any(a in s.lower() for a in _ADVICE)
    ]
    reason = "; ".join(kept) if kept else type(e).__name__
    return reason[:200]


def _non_finite_weights(state: Mapping) -> tuple[int, list[str]]:
    n_bad, names = 0, []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            bad = int(value.numel() - torch.isfinite(value).sum())
            if bad:
                n_bad += bad
                names.append(str(name))
    return n_bad, names


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (``weights_only=True``, onto the CPU) and check its format.

    Raises:
        CheckpointError: missing, not a regular file, or unreadable; a pickle payload or other
            non-primitive content ("not a safe aad-med checkpoint"); not an aad-med checkpoint;
            model weights holding NaN or Inf. The one line names the file and never suggests
            loading with ``weights_only=False``.
    """
    path = Path(path)
    problem = checkpoint_path_problem(path)
    if problem:
        raise CheckpointError(problem)
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it "might not support": the error says it all.
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: not a safe aad-med checkpoint (refused by weights_only loading: "
            f"{_torch_reason(e)})"
        ) from None
    except PermissionError:
        raise CheckpointError(f"{path}: permission denied (file is not readable)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as e:
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or corrupt: {_torch_reason(e)})"
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
    if not isinstance(ckpt["model_state"], Mapping):
        raise CheckpointError(f"{path}: checkpoint model_state is not a mapping of tensors")
    n_bad, names = _non_finite_weights(ckpt["model_state"])
    if n_bad:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise CheckpointError(
            f"{path}: model weights hold {n_bad} NaN/Inf value(s) in {len(names)} tensor(s) "
            f"({shown}); the checkpoint is unusable (a diverged or corrupted run)"
        )
    return ckpt


MIN_SPACING_MM = 0.05
MAX_SPACING_MM = 20.0
MAX_PATCH_SIZE = 512


def check_preprocessing_record(path: str | Path, record: object) -> None:
    """Refuse a checkpoint's preprocessing record that cannot work (one line naming the file).

    Catches what :class:`PreprocessingConfig` alone lets through and what would otherwise end
    in a traceback or an absurd allocation: a non-positive or non-integer ``eval_stride``, a
    spacing outside ``[MIN_SPACING_MM, MAX_SPACING_MM]`` or not finite, a ``patch_size`` that
    is not an integer in ``[4, MAX_PATCH_SIZE]``.

    Raises:
        CheckpointError: naming the checkpoint, the key and the value.
    """

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: invalid preprocessing record: {what}")

    if not isinstance(record, Mapping):
        raise bad(f"expected a mapping, got {type(record).__name__}")
    stride = record.get("eval_stride")
    if stride is not None and (
        isinstance(stride, bool) or not isinstance(stride, int) or stride < 1
    ):
        raise bad(f"eval_stride={stride!r} (must be a whole number >= 1, or null)")
    patch = record.get("patch_size", 32)
    if isinstance(patch, bool) or not isinstance(patch, int) or not 4 <= patch <= MAX_PATCH_SIZE:
        raise bad(f"patch_size={patch!r} (must be a whole number in [4, {MAX_PATCH_SIZE}])")
    spacing = record.get("spacing", [1.0, 1.0, 1.0])
    try:
        values = [float(v) for v in spacing]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(
        np.isfinite(v) and MIN_SPACING_MM <= v <= MAX_SPACING_MM for v in values
    ):
        raise bad(
            f"spacing={spacing!r} (must be three numbers in [{MIN_SPACING_MM}, "
            f"{MAX_SPACING_MM}] mm)"
        )


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
    check_preprocessing_record(path, ckpt["preprocessing"])
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


# -- resume -----------------------------------------------------------------------------------

RESUME_STRICT_KEYS = (
    "seed",
    "data",
    "optim",
    "loss",
    "trainer.batch_size",
    "trainer.max_epochs",
    "trainer.warmup_epochs",
)
"""Config keys (and every key below them) that must be equal to resume: the data, seed,
optimisation (optimizer, lr, schedule, clipping, loss) and anything that sets the learning-rate
schedule (``max_epochs`` fixes the schedule's length). A resumed run is the same run. The model
is compared separately, as the recorded ``model_config`` (``Trainer.load_state``)."""

RESUME_FREE_KEYS = ("data.num_workers", "data.cache", "data.cache_dir", "data.skip_invalid")
"""Keys under :data:`RESUME_STRICT_KEYS` that only change how the data is loaded, not which."""

RESUME_ALLOW_KEY = "trainer.resume_allow_changes"
"""Set to true (``+trainer.resume_allow_changes=true``) to resume despite changes; the
checkpoint then records them in ``resume_history`` and keeps the union of training subjects."""


def _flatten(obj: object, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, Mapping):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        if not obj and prefix:
            out[prefix[:-1]] = {}
        return out
    return {prefix[:-1]: obj}


def _is_strict(key: str) -> bool:
    def under(k: str, roots: tuple[str, ...]) -> bool:
        return any(k == r or k.startswith(r + ".") for r in roots)

    return under(key, RESUME_STRICT_KEYS) and not under(key, RESUME_FREE_KEYS)


def _short_value(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def resume_config_differences(saved: Mapping | None, current: Mapping) -> list[str]:
    """The strict config keys (:data:`RESUME_STRICT_KEYS`) whose values differ, as
    ``"key (saved -> current)"`` lines, sorted by key."""
    if not saved:
        return []
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if _is_strict(k))
    return [
        f"{k} ({_short_value(old.get(k, '<unset>'))} -> {_short_value(new.get(k, '<unset>'))})"
        for k in keys
        if old.get(k, "<unset>") != new.get(k, "<unset>")
    ]


def _subject_keys(entries: object) -> set[tuple[str, str]]:
    out = set()
    for e in entries or []:
        if isinstance(e, Mapping):
            out.add((str(e.get("cohort", "")), str(e.get("subject_id", ""))))
    return out


def resume_subject_differences(saved: Mapping, metadata: Mapping) -> list[str]:
    """How the training and validation subjects differ from the checkpoint's, one item each
    (empty when the same, or when the checkpoint does not record them)."""
    out = []
    # After an allowed change, train_subjects is the union; run_train_subjects the last run's.
    key = "run_train_subjects" if "run_train_subjects" in saved else "train_subjects"
    if key in saved and "train_subjects" in metadata:
        old, new = _subject_keys(saved[key]), _subject_keys(metadata["train_subjects"])
        if old != new:
            out.append(
                f"training subjects ({len(new - old)} new, {len(old - new)} no longer present "
                f"of {len(old)})"
            )
    if "val_subject_ids" in saved and "val_subject_ids" in metadata:
        old_val, new_val = (sorted(map(str, d["val_subject_ids"])) for d in (saved, metadata))
        if old_val != new_val:
            out.append("validation subjects")
    return out


def resume_allowed(config: Mapping | None) -> bool:
    """Whether the config sets :data:`RESUME_ALLOW_KEY` to true."""
    trainer = (config or {}).get("trainer") or {}
    return bool(trainer.get(RESUME_ALLOW_KEY.split(".", 1)[1], False))


def check_resume_compatible(
    path: str | Path, saved: Mapping, config: Mapping, metadata: Mapping | None = None
) -> list[str]:
    """Refuse to resume ``saved`` (loaded from ``path``) under a different data, seed, model or
    optimisation config, or with other subjects.

    Args:
        path: the checkpoint, named in the message.
        saved: the loaded checkpoint (its ``config``, ``train_subjects``, ``val_subject_ids``).
        config: the resolved config of the resuming run.
        metadata: the resuming run's checkpoint metadata (``train_subjects``,
            ``val_subject_ids``); ``None`` compares the config only.

    Returns:
        The differences, when :data:`RESUME_ALLOW_KEY` allows them (empty when none).

    Raises:
        CheckpointError: one line naming the checkpoint and every differing key.
    """
    diffs = resume_config_differences(saved.get("config"), config)
    if not saved.get("config"):
        # Checkpoints written outside aad-train may lack the config: compare what they record.
        for key, now in (("seed", config.get("seed")),):
            if key in saved and now is not None and saved[key] != now:
                diffs.append(f"{key} ({saved[key]!r} -> {now!r})")
    if metadata is not None:
        diffs += resume_subject_differences(saved, metadata)
    if diffs and not resume_allowed(config):
        # "+key=..." adds a key the config lacks; Hydra refuses it once configs declare the key.
        declared = RESUME_ALLOW_KEY.split(".", 1)[1] in ((config or {}).get("trainer") or {})
        plus = "" if declared else "+"
        raise CheckpointError(
            f"{path}: refusing to resume with settings that differ from the checkpoint's: "
            f"{'; '.join(diffs)}. Resume with the run's own config (config.yaml next to "
            f"checkpoints/), or set {plus}{RESUME_ALLOW_KEY}=true to continue anyway"
        )
    return diffs


def merged_training_record(saved: Mapping, metadata: Mapping, changes: list[str]) -> dict:
    """Metadata for a resume that was allowed to change settings: ``train_subjects``,
    ``train_subject_ids`` and ``cohorts`` become the union of the checkpoint's and the current
    ones (so leakage checks see every subject the weights were trained on),
    ``run_train_subjects`` keeps the current run's own, and ``resume_history`` gains one entry
    (epoch, changes, previous cohorts) when ``changes`` is not empty. Also used, with no
    changes, to carry a merged record through a later plain resume."""
    out = dict(metadata)
    out["run_train_subjects"] = list(metadata.get("train_subjects") or [])
    old = [dict(e) for e in saved.get("train_subjects") or [] if isinstance(e, Mapping)]
    seen = _subject_keys(old)
    union = old + [
        dict(e)
        for e in metadata.get("train_subjects") or []
        if (str(e.get("cohort", "")), str(e.get("subject_id", ""))) not in seen
    ]
    out["train_subjects"] = union
    ids = list(dict.fromkeys([*map(str, saved.get("train_subject_ids") or [])]))
    ids += [i for i in map(str, metadata.get("train_subject_ids") or []) if i not in ids]
    out["train_subject_ids"] = ids
    cohorts = list(dict.fromkeys([*map(str, saved.get("cohorts") or [])]))
    cohorts += [c for c in map(str, metadata.get("cohorts") or []) if c not in cohorts]
    out["cohorts"] = cohorts
    out["resume_history"] = list(saved.get("resume_history") or [])
    if changes:
        out["resume_history"].append(
            {
                "epoch": int(saved.get("epoch", 0)),
                "changes": list(changes),
                "cohorts": [str(c) for c in saved.get("cohorts") or []],
            }
        )
    return out
