"""Stage 3, training: the run folder: unique names, and never overwriting results silently.

``register_resolvers()`` adds the OmegaConf resolvers the Hydra configs use for the run folder
(``${aad_run_id:}``: a timestamp with microseconds plus a random suffix, shared by all processes
of one torchrun launch; ``${aad_output_subdir:}``: ``.hydra`` on rank 0 only). Nothing here
trains.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from aad_med.errors import ConfigError

RESULT_PATTERNS = (
    "checkpoints/*.pt",
    "loss_curve.png",
    "reconstructions.png",
    "tensorboard/events.*",
    "config.yaml",
)
"""What counts as results in a run folder: a run never writes over these unless told to."""


def run_id() -> str:
    """Name of a new run folder, unique even for runs started in the same second.

    Under torchrun every process must agree without talking to the others, so the name is
    derived from the launch's rendezvous ID (a fresh UUID with ``--standalone``) and the
    launcher's address; otherwise it is the local time to the microsecond plus 4 random hex
    digits.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ:
        key = "|".join(
            os.environ.get(k, "")
            for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
        )
        if os.environ.get("TORCHELASTIC_RUN_ID", "none") == "none":
            key += f"|{os.getppid()}"
        return "ddp_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f") + "_" + secrets.token_hex(2)


def _output_subdir() -> str | None:
    return ".hydra" if int(os.environ.get("RANK", "0")) == 0 else None


def register_resolvers() -> None:
    """Register ``aad_run_id`` and ``aad_output_subdir`` (idempotent).

    ``aad_run_id`` is cached, so every use in one process gives the same name.
    """
    if not OmegaConf.has_resolver("aad_run_id"):
        OmegaConf.register_new_resolver("aad_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("aad_output_subdir"):
        OmegaConf.register_new_resolver("aad_output_subdir", _output_subdir)


def existing_results(run_dir: str | Path) -> list[Path]:
    """Result files already in ``run_dir`` (see :data:`RESULT_PATTERNS`)."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    for pattern in RESULT_PATTERNS:
        found.extend(sorted(run_dir.glob(pattern)))
    return found


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_run_dir(
    run_dir: str | Path, resume: str | Path | None, overwrite: bool, delete: bool = True
) -> None:
    """Refuse a run folder that already holds results, unless resuming it or told to overwrite.

    With ``overwrite`` the old results are deleted first (by the caller with ``delete``, i.e.
    rank 0), so old and new never mix.

    Raises:
        ConfigError: the folder holds results and neither ``trainer.resume`` points into it nor
            ``overwrite=true`` was given (the message says which to set).
    """
    run_dir = Path(run_dir)
    found = existing_results(run_dir)
    if not found:
        return
    if resume is not None and _inside(Path(resume), run_dir):
        return
    if overwrite:
        if not delete:
            return
        for name in ("checkpoints", "tensorboard"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        for name in ("loss_curve.png", "reconstructions.png", "config.yaml"):
            (run_dir / name).unlink(missing_ok=True)
        return
    shown = ", ".join(str(p.relative_to(run_dir)) for p in found[:3])
    raise ConfigError(
        f"{run_dir}: run folder already holds results ({shown}); continue it with "
        f"trainer.resume={run_dir / 'checkpoints' / 'last.pt'}, replace it with overwrite=true, "
        "or choose another hydra.run.dir"
    )
