"""How every console script reports expected failures: one line per problem on stderr, exit code
2, no traceback unless verbose. The environment's failures are expected too: an ``OSError``
(disk full, read-only folder, a file where a folder should be) is one line naming the path and
exit 2; Ctrl-C is one line and exit 130; a closed output pipe (``aad-inspect | head``) ends
quietly with exit 2. Other unexpected exceptions still propagate (they are bugs)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from aad_med.errors import AADError
from aad_med.io_utils import CacheWarning

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what shells report for a command stopped by Ctrl-C."""


def os_error_line(e: OSError) -> str:
    """``PATH: problem`` for an environment error (``No space left on device``, ...)."""
    where = e.filename if e.filename is not None else None
    what = e.strerror or str(e) or type(e).__name__
    return f"{where}: {what}" if where is not None else what


def silence_stdout() -> None:
    """Point stdout at ``/dev/null`` so the interpreter's final flush into a closed pipe does not
    print ``Exception ignored ... BrokenPipeError`` after we have exited quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Verbose when ``--verbose``/``-v`` or ``verbose=true`` is on the command line, or
    ``AAD_MED_VERBOSE=1`` is set."""
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("AAD_MED_VERBOSE", "") not in ("", "0"):
        return True
    return any(a in ("-v", "--verbose", "verbose=true", "verbose=True") for a in argv)


def one_line_cache_warnings(prog: str) -> None:
    """Show :class:`~aad_med.io_utils.CacheWarning` as ``prog: warning: <line>`` (the file and
    source line Python adds say nothing to a user); other warnings as before."""
    original = warnings.showwarning
    if getattr(original, "_aad_prog", None) == prog:
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            original(message, category, filename, lineno, file, line)

    show._aad_prog = prog
    warnings.showwarning = show


def run_reporting_errors(
    prog: str, fn: Callable[[], int | None], verbose: bool | None = None
) -> int:
    """Call ``fn``; turn an :class:`AADError` or an ``OSError`` into ``prog: error: <line>``
    lines and exit code 2, Ctrl-C into ``prog: interrupted`` and 130, a broken output pipe into
    a quiet exit 2."""
    verbose = verbose_requested() if verbose is None else verbose
    if not verbose:
        one_line_cache_warnings(prog)
    try:
        rc = fn()
    except AADError as e:
        if verbose:
            raise
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"{prog}: error: {line}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except BrokenPipeError:
        # The reader went away (``| head``): nothing left to say, and nowhere to say it.
        silence_stdout()
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        if verbose:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        if verbose:
            raise
        print(f"{prog}: error: {os_error_line(e)}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return int(rc or 0)
