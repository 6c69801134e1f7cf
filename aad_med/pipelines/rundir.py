"""The run folder of every command: unique names, never overwriting results silently, results
published all at once, and no folder left behind by a failed run.

Shared by ``aad-train``, ``aad-compare`` and ``aad-calibrate``: each says which files count as
its results (:data:`RESULT_PATTERNS` for training, ``aad_med.pipelines.compare.RESULT_PATTERNS``,
``aad_med.pipelines.calibrate.RESULT_FILES``); :func:`check_run_dir` refuses a folder already
holding any of them, :func:`publish` moves a complete staged result set into place and
:func:`remove_failed_run` removes the folder of a run that failed before producing results.

``register_resolvers()`` adds the OmegaConf resolvers the Hydra configs use for the run folder
(``${aad_run_id:}``: a timestamp with microseconds plus a random suffix, shared by all processes
of one torchrun launch; ``${aad_output_subdir:}``: on rank 0 only, a staging folder
``.hydra.pending-PID`` that :func:`finish_hydra_subdir` makes the folder's ``.hydra/`` only when
the run wrote results, so a refused or failed run never rewrites the provenance of results that
came from another run).

Guards against a hostile environment: :func:`check_output_folder` refuses a run folder that is a
file, lies under a file, cannot be written or lies inside an input cohort, before anything is
written; :func:`run_lock` makes a second run into a folder in use fail with one line instead of
deleting the first's temporary files. Nothing here computes anything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
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


HYDRA_SUBDIR = ".hydra"
HYDRA_STAGING_PREFIX = ".hydra.pending-"
"""Hydra writes its ``.hydra/`` files here first (one per process); see
:func:`finish_hydra_subdir`."""


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _output_subdir() -> str | None:
    return f"{HYDRA_STAGING_PREFIX}{os.getpid()}" if _is_rank_zero() else None


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
    run_dir: str | Path,
    preexisting: Path | None,
    patterns: Sequence[str],
    before: set[str] | None = None,
) -> None:
    """Remove the folder of a run that failed before producing results (``.hydra/``, its log).

    A folder that existed before the run (``preexisting``) or holds results is never removed;
    in one that existed, a log file the run created (not among ``before``, the names there
    before the run) is removed.
    """
    run_dir = Path(run_dir)
    if preexisting is not None and run_dir.resolve() == preexisting.resolve():
        remove_new_logs(run_dir, before)
        return
    if not run_dir.exists() or existing_results(run_dir, patterns):
        return
    _close_log_files(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def _close_log_files(folder: Path) -> list[Path]:
    """Detach and close the root logger's file handlers writing inside ``folder``."""
    root = logging.getLogger()
    closed = []
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).is_relative_to(
            folder.resolve()
        ):
            root.removeHandler(h)
            h.close()
            closed.append(Path(h.baseFilename))
    return closed


def remove_new_logs(run_dir: Path, before: set[str] | None) -> None:
    """In a folder that existed before a failed run, remove the log files this run created
    (Hydra opens ``JOB.log`` before the job starts), so the folder holds no new files."""
    if before is None:
        return
    for log_file in run_dir.glob("*.log"):
        if log_file.name not in before:
            _close_log_files(log_file)
            with contextlib.suppress(OSError):
                log_file.unlink()


def folder_entries(run_dir: str | Path | None) -> set[str] | None:
    """Names in ``run_dir`` before a run (``None`` when it does not exist)."""
    if run_dir is None:
        return None
    try:
        return set(os.listdir(run_dir))
    except OSError:
        return None


def results_state(run_dir: str | Path, patterns: Sequence[str]) -> dict[str, int]:
    """``{result file: mtime in ns}``: compared before and after a run to tell whether it wrote
    results."""
    state = {}
    for p in existing_results(run_dir, patterns):
        with contextlib.suppress(OSError):
            state[str(p)] = p.stat().st_mtime_ns
    return state


def finish_hydra_subdir(
    run_dir: str | Path, staged: str | Path | None, wrote_results: bool
) -> None:
    """Make Hydra's staged config folder the run folder's ``.hydra/`` when this run wrote its
    results, else delete it: ``.hydra/`` of a folder is replaced only together with its results.

    Also removes staging folders left by processes that no longer run (killed runs).
    """
    run_dir = Path(run_dir)
    if staged is not None and Path(staged).name != HYDRA_SUBDIR:
        staged = Path(staged)
        if staged.is_dir() and wrote_results:
            final = run_dir / HYDRA_SUBDIR
            old = run_dir / f".hydra.old-{os.getpid()}-{secrets.token_hex(2)}"
            if final.exists():
                os.replace(final, old)
            os.replace(staged, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            shutil.rmtree(staged, ignore_errors=True)
    for leftover in run_dir.glob(f"{HYDRA_STAGING_PREFIX}*"):
        pid = leftover.name[len(HYDRA_STAGING_PREFIX) :]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_folder(run_dir: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse a run folder that cannot hold results, before anything is written.

    Args:
        run_dir: the run folder (``hydra.run.dir``); it need not exist.
        inputs: input cohorts (folders or CSV manifests): results never go inside one.

    Raises:
        ConfigError: ``run_dir`` (or a folder above it) is a file, the nearest existing folder
            is not writable, or ``run_dir`` is an input cohort or lies inside one.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.parents):
        if not os.path.lexists(folder):
            continue
        if not folder.is_dir():
            what = "hydra.run.dir" if folder == run_dir else "a folder above hydra.run.dir"
            raise ConfigError(
                f"{folder}: {what} is an existing file, not a folder; choose another hydra.run.dir"
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{folder}: folder is not writable (read-only?); choose another hydra.run.dir"
            )
        break
    for cohort in inputs:
        cohort = Path(cohort)
        if not cohort.exists():
            continue
        base = cohort if cohort.is_dir() else None
        if (base is not None and _inside(run_dir, base)) or run_dir.resolve() == cohort.resolve():
            raise ConfigError(
                f"{run_dir}: run folder is inside the input cohort {cohort}; results are never "
                "written into an input cohort, choose another hydra.run.dir"
            )


LOCK_NAME = ".aad-run.lock"
_HELD: dict[str, int] = {}
"""Locks this process holds: ``{resolved folder: fd}``; an inner :func:`run_lock` of a folder
already held is a no-op, the outermost one releases it."""


def acquire_run_lock(run_dir: str | Path) -> Callable[[], None]:
    """Hold the run folder for this run: a second run into it is refused, not destructive.

    An exclusive ``flock`` on ``RUN_DIR/.aad-run.lock`` holding the owner's PID. The kernel drops
    the lock when its process dies, so a killed run's lock is taken over without guessing
    whether its PID is alive; the file is removed when the lock is released. Re-entrant within
    a process (the CLI and :func:`aad_med.pipelines.compare.run_comparison` both take it: an
    inner acquisition of a folder already held is a no-op). Under torchrun only rank 0 locks
    (every rank writes into the one folder).

    Returns:
        The function that releases the lock (call it once).

    Raises:
        ConfigError: another live process holds the folder (names its PID).
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _HELD or not _is_rank_zero():
        return lambda: None
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = ""
            with contextlib.suppress(OSError, ValueError, IndexError):
                owner = f" (PID {int(path.read_text().split()[0])})"
            raise ConfigError(
                f"{run_dir}: another run{owner} is writing into this folder; wait for it to "
                "finish or choose another hydra.run.dir"
            ) from None
        # The previous holder may have removed the file between our open and lock: then we hold
        # a lock on a deleted file, and must take the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = fd

    def release() -> None:
        if _HELD.pop(key, None) is None:
            return
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)

    return release


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """:func:`acquire_run_lock` as a context manager."""
    release = acquire_run_lock(run_dir)
    try:
        yield
    finally:
        release()
