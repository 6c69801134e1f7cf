"""``aad-train``: train the autoencoder from the Hydra config ``configs/train.yaml``.

Thin entry point: compose the config, hand it to
:func:`aad_med.pipelines.train.train_from_config`.
Also runs as ``python -m aad_med.cli.train`` and under ``torchrun`` (same arguments). Expected
failures print ``aad-train: error: <line>`` and exit with code 2 (tracebacks with
``verbose=true``, ``--verbose`` or ``AAD_MED_VERBOSE=1``).
"""

from __future__ import annotations

import sys

from aad_med.cli._errors import EXIT_INPUT_ERROR, run_reporting_errors, verbose_requested
from aad_med.cli._runfolder import (
    explicit_run_dir,
    flag,
    hydra_command,
    override_value,
    print_version_if_asked,
    strip_verbose_flags,
)
from aad_med.errors import AADError, ConfigError
from aad_med.pipelines.rundir import RESULT_PATTERNS, check_run_dir, register_resolvers

PROG = "aad-train"
register_resolvers()


def _precheck_run_dir(argv: list[str]) -> None:
    """Refuse an explicit ``hydra.run.dir`` holding results before Hydra writes ``.hydra/`` there."""
    run_dir = explicit_run_dir(argv)
    if run_dir is None:
        return
    resume = override_value(argv, "trainer.resume")
    check_run_dir(
        run_dir, None if resume in (None, "null") else resume, flag(argv, "overwrite"), delete=False
    )


def _check_launcher(argv: list[str]) -> None:
    if override_value(argv, "launcher") == "slurm":
        try:
            import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        except ImportError:
            raise ConfigError(
                "launcher=slurm needs Hydra's submitit launcher: pip install 'aad-med[slurm]' "
                "(hydra-submitit-launcher)"
            ) from None


def main() -> int:
    """Console entry point of ``aad-train``."""
    argv = sys.argv[1:]
    verbose = verbose_requested(argv)
    argv = strip_verbose_flags(argv)
    print_version_if_asked(PROG, argv)

    def prechecks() -> None:
        _check_launcher(argv)
        _precheck_run_dir(argv)

    rc = run_reporting_errors(PROG, prechecks, verbose=verbose)
    if rc:
        return rc
    try:
        from aad_med.pipelines.train import train_from_config

        hydra_command(PROG, "train", train_from_config, RESULT_PATTERNS, argv)
    except AADError as e:
        # Hydra re-raises task errors when HYDRA_FULL_ERROR is set (verbose mode).
        if verbose:
            raise
        for line in str(e).splitlines():
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
