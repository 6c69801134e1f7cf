"""The Hydra console scripts (``aad-train``, ``aad-compare``, ``aad-calibrate``) as seen from
the command line: reading ``key=value`` overrides before Hydra starts (so a refused run leaves
an existing folder untouched, ``.hydra/`` included), ``--version``, and the Hydra job body that
reports errors in one line and removes the folder a failed run created
(:func:`aad_med.pipelines.rundir.remove_failed_run`)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aad_med.cli._errors import run_reporting_errors, verbose_requested
from aad_med.pipelines.rundir import remove_failed_run


def override_value(argv: Sequence[str], key: str) -> str | None:
    """The value of ``key=...`` (also ``+key=``/``++key=``) on the command line, else ``None``."""
    for arg in argv:
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
    return None


def explicit_run_dir(argv: Sequence[str]) -> Path | None:
    """``hydra.run.dir`` given on the command line of a single run (not ``--multirun``)."""
    run_dir = override_value(argv, "hydra.run.dir")
    if run_dir is None or "--multirun" in argv or "-m" in argv:
        return None
    return Path(run_dir)


def flag(argv: Sequence[str], key: str) -> bool:
    """``key=true`` on the command line (any case, as Hydra reads booleans)."""
    return (override_value(argv, key) or "false").strip().lower() == "true"


def run_hydra_job(
    prog: str,
    cfg,
    job: Callable[[object, Path], object],
    patterns: Sequence[str],
    preexisting: Path | None,
) -> None:
    """Body of every ``@hydra.main`` entry point: run ``job(cfg, run_dir)`` with one-line errors,
    and on failure remove the run folder Hydra made (unless it existed or holds results)."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    verbose = verbose_requested() or bool(cfg.get("verbose", False))
    rc = run_reporting_errors(prog, lambda: job(cfg, run_dir) and 0, verbose=verbose)
    if rc:
        remove_failed_run(run_dir, preexisting, patterns)
        # SystemExit passes through Hydra's own error handler, keeping the one-line message.
        sys.exit(rc)


def strip_verbose_flags(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``-v``/``--verbose``, which Hydra's parser rejects; when they were given,
    the environment carries verbosity instead (``AAD_MED_VERBOSE``, ``HYDRA_FULL_ERROR``)."""
    if verbose_requested(list(argv)):
        os.environ["AAD_MED_VERBOSE"] = "1"
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    return [a for a in argv if a not in ("-v", "--verbose")]


def hydra_command(
    prog: str,
    config_name: str,
    job: Callable[[object, Path], object],
    patterns: Sequence[str],
    argv: Sequence[str],
) -> None:
    """Run ``job(cfg, run_dir)`` as the Hydra application ``prog`` over ``argv``.

    The ``@hydra.main`` function is built here, per call, so the state it needs (the run folder
    that existed before, which a failure must not remove) travels in a closure rather than in a
    module-level global.
    """
    import hydra

    from aad_med.pipelines.rundir import register_resolvers
    from aad_med.resources import CONFIG_DIR

    register_resolvers()
    preexisting = preexisting_run_dir(argv)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def _hydra_main(cfg) -> None:
        run_hydra_job(prog, cfg, job, patterns, preexisting)

    sys.argv = [sys.argv[0], *argv]
    _hydra_main()


def print_version_if_asked(prog: str, argv: Sequence[str]) -> None:
    """``--version`` anywhere on the command line: print ``PROG VERSION`` and exit 0."""
    if "--version" in argv:
        from aad_med import __version__

        print(f"{prog} {__version__}")
        sys.exit(0)


def preexisting_run_dir(argv: Sequence[str]) -> Path | None:
    """The explicit ``hydra.run.dir`` when it already exists (a failed run must not remove it)."""
    run_dir = explicit_run_dir(argv)
    return run_dir.resolve() if run_dir is not None and run_dir.exists() else None
