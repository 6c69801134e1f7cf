"""The run folder of every command: unique names, never overwriting results silently, results
published all at once, and no folder left behind by a failed run.

Shared by ``aad-train``, ``aad-compare`` and ``aad-calibrate``: each says which files count as
its results (:data:`RESULT_PATTERNS` for training, ``aad_med.pipelines.compare.RESULT_PATTERNS``,
``aad_med.pipelines.calibrate.RESULT_FILES``); :func:`check_run_dir` refuses a folder already
holding any of them, :func:`publish` moves a complete staged result set into place and
:func:`remove_failed_run` removes the folder of a run that failed before producing results.

``register_resolvers()`` adds the OmegaConf resolvers the Hydra configs use for the run folder
(``${aad_run_id:}``: a timestamp with microseconds plus a random suffix, shared by all processes
of one torchrun launch; ``${aad_output_subdir:}``: ``.hydra`` on rank 0 only). Nothing here
computes anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
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
"""What counts as results in an ``aad-train`` run folder: never written over unless told to."""


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


def existing_results(run_dir: str | Path, patterns: Sequence[str] = RESULT_PATTERNS) -> list[Path]:
    """Result files already in ``run_dir``: those matching ``patterns`` (globs relative to it)."""
    run_dir = Path(run_dir)
    found: list[Path] = []
    for pattern in patterns:
        found.extend(sorted(run_dir.glob(pattern)))
    return found


def result_entries(run_dir: str | Path, patterns: Sequence[str] = RESULT_PATTERNS) -> list[Path]:
    """Top-level entries of ``run_dir`` holding results (``checkpoints/``, ``report.md``, ...):
    what replacing the results removes, so that old and new results never mix."""
    run_dir = Path(run_dir)
    tops = {run_dir / p.relative_to(run_dir).parts[0] for p in existing_results(run_dir, patterns)}
    return sorted(tops)


def remove_results(run_dir: str | Path, patterns: Sequence[str] = RESULT_PATTERNS) -> None:
    """Delete every top-level entry of ``run_dir`` holding results (see :func:`result_entries`)."""
    for entry in result_entries(run_dir, patterns):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_run_dir(
    run_dir: str | Path,
    resume: str | Path | None,
    overwrite: bool,
    delete: bool = True,
    patterns: Sequence[str] = RESULT_PATTERNS,
    resume_hint: bool = True,
) -> None:
    """Refuse a run folder that already holds results, unless resuming it or told to overwrite.

    With ``overwrite`` and ``delete`` the old results are deleted here (by rank 0 in training),
    so old and new never mix; with ``delete=False`` the caller replaces them itself (aad-compare
    does so only once its new results are complete).

    Args:
        run_dir: the run folder (it need not exist).
        resume: a checkpoint being resumed; one inside ``run_dir`` allows its results.
        overwrite: allow replacing the results (``overwrite=true``).
        delete: with ``overwrite``, delete the old results now.
        patterns: globs, relative to ``run_dir``, of the files that count as results.
        resume_hint: mention ``trainer.resume`` in the message (training only).

    Raises:
        ConfigError: the folder holds results and neither ``trainer.resume`` points into it nor
            ``overwrite=true`` was given (one line naming the folder and what to set).
    """
    run_dir = Path(run_dir)
    found = existing_results(run_dir, patterns)
    if not found:
        return
    if resume is not None and _inside(Path(resume), run_dir):
        return
    if overwrite:
        if delete:
            remove_results(run_dir, patterns)
        return
    shown = ", ".join(str(p.relative_to(run_dir)) for p in found[:3])
    how = "replace it with overwrite=true, or choose another hydra.run.dir"
    if resume_hint:
        how = f"continue it with trainer.resume={run_dir / 'checkpoints' / 'last.pt'}, " + how
    raise ConfigError(f"{run_dir}: run folder already holds results ({shown}); {how}")


def publish(stage: Path, run_dir: Path, patterns: Sequence[str], aside: str) -> list[Path]:
    """Move the complete result set in ``stage`` into ``run_dir`` and remove ``stage``.

    Earlier results (``patterns``, after ``overwrite=true``) and entries of the same names are
    first moved into the hidden folder ``run_dir / aside``, so the run folder never mixes old and
    new results (an earlier file this run does not write cannot pass for one of its results) and
    an interruption leaves them recoverable; they are deleted once every new output is in place.

    Returns:
        The new entries of ``run_dir``.
    """
    old = run_dir / aside
    entries = result_entries(run_dir, patterns)
    entries += [run_dir / e.name for e in stage.iterdir() if (run_dir / e.name).exists()]
    if entries:
        old.mkdir()
        for entry in sorted(set(entries)):
            os.replace(entry, old / entry.name)
    published = []
    for entry in sorted(stage.iterdir()):
        os.replace(entry, run_dir / entry.name)
        published.append(run_dir / entry.name)
    stage.rmdir()
    shutil.rmtree(old, ignore_errors=True)
    return published


def remove_failed_run(
    run_dir: str | Path, preexisting: Path | None, patterns: Sequence[str]
) -> None:
    """Remove the folder of a run that failed before producing results (``.hydra/``, its log).

    A folder that existed before the run (``preexisting``) or holds results is never removed.
    """
    run_dir = Path(run_dir)
    if preexisting is not None and run_dir.resolve() == preexisting.resolve():
        return
    if not run_dir.exists() or existing_results(run_dir, patterns):
        return
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(
            run_dir.resolve()
        ):
            root.removeHandler(h)
            h.close()
    shutil.rmtree(run_dir, ignore_errors=True)
