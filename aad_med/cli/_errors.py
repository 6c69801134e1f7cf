"""How every console script reports expected failures: one line per problem on stderr, exit code
2, no traceback unless verbose. Unexpected exceptions still propagate (they are bugs)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from aad_med.errors import AADError

EXIT_INPUT_ERROR = 2


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Verbose when ``--verbose``/``-v`` or ``verbose=true`` is on the command line, or
    ``AAD_MED_VERBOSE=1`` is set."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("AAD_MED_VERBOSE", "") not in ("", "0"):
        return True
    return any(a in ("-v", "--verbose", "verbose=true", "verbose=True") for a in argv)


def run_reporting_errors(
    prog: str, fn: Callable[[], int | None], verbose: bool | None = None
) -> int:
    """Call ``fn``; turn an :class:`AADError` into ``prog: error: <line>`` lines and exit code 2."""
    verbose = verbose_requested() if verbose is None else verbose
    try:
        rc = fn()
    except AADError as e:
        if verbose:
            raise
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return int(rc or 0)
