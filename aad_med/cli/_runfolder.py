"""The Hydra console scripts (``aad-train``, ``aad-compare``, ``aad-calibrate``) as seen from
the command line: reading ``key=value`` overrides before Hydra starts (so a refused run leaves
an existing folder untouched, ``.hydra/`` included: a run folder that is a file, is not
writable or lies inside an input cohort is refused here), ``--version``, and the Hydra job body
that holds the run folder's lock (:func:`aad_med.pipelines.rundir.run_lock`), reports errors in
one line (exit 2, 130 for Ctrl-C), publishes Hydra's staged ``.hydra/`` only with results
(:func:`aad_med.pipelines.rundir.finish_hydra_subdir`) and removes the folder a failed run
created (:func:`aad_med.pipelines.rundir.remove_failed_run`)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aad_med.cli._errors import EXIT_INTERRUPTED, run_reporting_errors, verbose_requested
from aad_med.pipelines.rundir import (
    check_output_folder,
    finish_hydra_subdir,
    folder_entries,
    remove_failed_run,
    results_state,
    run_lock,
)

_INPUT_KEYS = ("cohorts.", "reference", "data.cohorts", "source", "target", "sources.", "targets.")
"""Overrides naming input cohorts: no run folder may lie inside one."""


def override_value(argv: Sequence[str], key: str) -> str | None:
    """The value of ``key=...`` (also ``+key=``/``++key=``) on the command line, else ``None``."""
    for arg in argv:
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if arg.startswith(prefix):
                value = arg[len(prefix) :]
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                    value = value[1:-1]  # quoted for Hydra: the path is inside
                return value
    return None


def explicit_run_dir(argv: Sequence[str]) -> Path | None:
    """``hydra.run.dir`` given on the command line of a single run (not ``--multirun``)."""
    run_dir = override_value(argv, "hydra.run.dir")
    if run_dir is None or "--multirun" in argv or "-m" in argv:
        return None
    return Path(run_dir)


def input_paths(argv: Sequence[str]) -> list[str]:
    """Input cohorts named on the command line (``cohorts.NAME=``, ``reference=``,
    ``data.cohorts=[A,B]``), quotes and brackets removed."""
    out = []
    for arg in argv:
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or not any(
            key == k or (k.endswith(".") and key.startswith(k)) for k in _INPUT_KEYS
        ):
            continue
        value = value.strip()
        parts = value[1:-1].split(",") if value.startswith("[") and value.endswith("]") else [value]
        out.extend(p.strip().strip("'\"") for p in parts if p.strip())
    return out


def check_cohort_name_overrides(argv: Sequence[str]) -> None:
    """Refuse ``cohorts.NAME=`` whose NAME cannot be a cohort name (Hydra would nest ``a.b``
    into ``{'a': {'b': ...}}``).

    Raises:
        ConfigError: names the override and the characters allowed.
    """
    from aad_med.errors import ConfigError

    for arg in argv:
        key, eq, _ = arg.lstrip("+").partition("=")
        if eq and key.startswith("cohorts."):
            from aad_med.pipelines.compare import NAME_PATTERN

            name = key[len("cohorts.") :]
            if not NAME_PATTERN.match(name):
                raise ConfigError(
                    f"{arg.lstrip('+')}: cohort name {name!r} may contain only letters, digits, '_' and '-' "
                    "(starting with a letter or digit)"
                )


def check_device_override(prog: str, config_name: str, argv: Sequence[str]) -> None:
    """``trainer.device=`` given to a command whose device key is ``device`` (Hydra would say
    only that ``trainer`` is not in its config).

    Raises:
        ConfigError: names the key to use instead.
    """
    from aad_med.errors import ConfigError

    if config_name == "train":
        return
    value = override_value(argv, "trainer.device")
    if value is not None:
        raise ConfigError(
            f"trainer.device={value}: {prog} has no trainer; its device key is "
            f"device=auto|cpu|cuda (e.g. device={value})"
        )


def precheck_output(argv: Sequence[str], prog: str = "", config_name: str = "") -> None:
    """Refuse an explicit ``hydra.run.dir`` that cannot hold results (a file, not writable,
    inside an input cohort) before Hydra writes anything (:func:`check_output_folder`), cohort
    names Hydra would misread and another command's device key."""
    check_cohort_name_overrides(argv)
    check_device_override(prog, config_name, argv)
    run_dir = explicit_run_dir(argv)
    if run_dir is not None:
        check_output_folder(run_dir, input_paths(argv))


_PATH_KEYS = (
    "cohorts.",
    "reference",
    "checkpoint",
    "hydra.run.dir",
    "hydra.sweep.dir",
    "source",
    "target",
    "sources.",
    "targets.",
    "performance",
)
"""Overrides whose value is a path, quoted for Hydra when needed (:func:`quote_path_values`)."""
_NEEDS_QUOTES = re.compile(r"[^A-Za-z0-9_\-+./:~@%$]")
"""Anything but the characters every Hydra version reads literally in an unquoted value."""


def hydra_quote(value: str) -> str:
    """``value`` as a single-quoted Hydra string (backslashes before a quote or the end doubled,
    quotes escaped), so Hydra's lexer takes it literally."""
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("'", "\\'") + "'"


def quote_path_values(argv: Sequence[str]) -> list[str]:
    """Quote path values holding characters Hydra's override grammar would misread (non-ASCII,
    spaces, ``= , [ ] ( ) { }``, quotes), so ``cohorts.a=/data/site,2`` means that folder, not a
    sweep or a lexer error about a ``++cohorts...`` the user never typed.

    Values already quoted, lists (``checkpoint=[A,B]``) and interpolations (``${...}``) are left
    as they are, and under ``--multirun`` so are values with commas (a sweep).
    """
    multirun = "--multirun" in argv or "-m" in argv
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+")
        is_path = bare in _PATH_KEYS or any(
            k.endswith(".") and bare.startswith(k) for k in _PATH_KEYS
        )
        if (
            not eq
            or not is_path
            or value[:1] in ("'", '"', "[")
            or "${" in value
            or not _NEEDS_QUOTES.search(value)
            or (multirun and "," in value)
        ):
            out.append(arg)
            continue
        out.append(f"{key}={hydra_quote(value)}")
    return out


def flag(argv: Sequence[str], key: str) -> bool:
    """``key=true`` on the command line (any case, as Hydra reads booleans)."""
    return (override_value(argv, key) or "false").strip().lower() == "true"


def run_hydra_job(
    prog: str,
    cfg,
    job: Callable[[object, Path], object],
    patterns: Sequence[str],
    existing: dict[Path, set[str] | None] | Path | None,
) -> None:
    """Body of every ``@hydra.main`` entry point: run ``job(cfg, run_dir)`` holding the run
    folder's lock, with one-line errors; make Hydra's staged config folder ``.hydra/`` only if
    the run wrote results; on failure remove the run folder Hydra made (unless it existed or
    holds results), or in a folder that existed, the log file Hydra made.

    Args:
        existing: run folders that existed before Hydra started, with the names they held
            (:func:`existing_folders`; a plain path for one folder whose entries are unknown).
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    staged = run_dir / hydra_cfg.output_subdir if hydra_cfg.output_subdir else None
    if isinstance(existing, Path):
        existing = {existing.resolve(): None}
    before_entries = (existing or {}).get(run_dir.resolve())
    preexisting = run_dir if run_dir.resolve() in (existing or {}) else None
    verbose = verbose_requested() or bool(cfg.get("verbose", False))
    before = results_state(run_dir, patterns)

    def body() -> int:
        with run_lock(run_dir):
            return job(cfg, run_dir) and 0

    rc = 1
    try:
        rc = run_reporting_errors(prog, body, verbose=verbose)
    finally:
        wrote = rc == 0 or results_state(run_dir, patterns) != before
        finish_hydra_subdir(run_dir, staged, wrote)
    if rc:
        remove_failed_run(run_dir, preexisting, patterns, before_entries)
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
    rc = run_reporting_errors(
        prog, lambda: precheck_output(argv, prog, config_name), verbose=verbose_requested(argv)
    )
    if rc:
        sys.exit(rc)
    existing = existing_folders(argv)

    @hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    def _hydra_main(cfg) -> None:
        run_hydra_job(prog, cfg, job, patterns, existing)

    sys.argv = [sys.argv[0], *quote_path_values(argv)]
    try:
        _hydra_main()
    except KeyboardInterrupt:
        # Ctrl-C outside the job (while Hydra composes or imports): the same one line.
        if verbose_requested(argv):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def print_version_if_asked(prog: str, argv: Sequence[str]) -> None:
    """``--version`` anywhere on the command line: print ``PROG VERSION`` and exit 0."""
    if "--version" in argv:
        from aad_med import __version__

        print(f"{prog} {__version__}")
        sys.exit(0)


def existing_folders(argv: Sequence[str]) -> dict[Path, set[str] | None]:
    """The run folders of this command line that exist before Hydra starts, with their entries:
    the explicit ``hydra.run.dir``, or under ``--multirun`` every folder of an existing
    ``hydra.sweep.dir`` (a job there must leave no new file either)."""
    out: dict[Path, set[str] | None] = {}
    single = preexisting_run_dir(argv)
    if single is not None:
        out[single] = folder_entries(single)
    sweep = override_value(argv, "hydra.sweep.dir")
    if sweep and ("--multirun" in argv or "-m" in argv) and Path(sweep).is_dir():
        for sub in Path(sweep).iterdir():
            if sub.is_dir() and not sub.is_symlink():
                out[sub.resolve()] = folder_entries(sub)
    return out


def preexisting_run_dir(argv: Sequence[str]) -> Path | None:
    """The explicit ``hydra.run.dir`` when it already exists (a failed run must not remove it)."""
    run_dir = explicit_run_dir(argv)
    return run_dir.resolve() if run_dir is not None and run_dir.exists() else None


def console_main(
    prog: str,
    config_name: str,
    job: Callable[[object, Path], object],
    patterns: Sequence[str],
    precheck: Callable[[list[str]], None],
    rewrite: Callable[[Sequence[str]], list[str]] = list,
) -> None:
    """A Hydra console script's ``main``: ``--version``, ``--verbose``, ``precheck(argv)``
    (refusals before Hydra writes anything), then :func:`hydra_command` over
    ``rewrite(argv)`` (e.g. ``cohorts.NAME=`` made ``++cohorts.NAME=``)."""
    argv = strip_verbose_flags(sys.argv[1:])
    print_version_if_asked(prog, argv)
    rc = run_reporting_errors(prog, lambda: precheck(argv), verbose=verbose_requested(argv))
    if rc:
        sys.exit(rc)
    hydra_command(prog, config_name, job, patterns, rewrite(argv))
