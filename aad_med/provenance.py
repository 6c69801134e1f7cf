"""What made a result, recorded with it so a reviewer can check it: the aad-med version, the
versions of torch, MONAI and numpy, the command line and the SHA-256 of the checkpoint(s).

Written into ``distances.json``, ``calibration.json``, the report and the training run folder
(``provenance.json``). Versions come from the installed distributions' metadata, so building the
block never imports torch or MONAI.
"""

from __future__ import annotations

import platform
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from aad_med import __version__
from aad_med.io_utils import file_digest

PACKAGES = ("torch", "monai", "numpy")
"""Distributions whose versions decide the numbers (the encoder's arithmetic, the statistics)."""


def package_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (``None`` when it is not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command line as a shell would take it back: the program without its folder, and
    ``python -m aad_med.cli.X`` for a module of this package run with ``-m``."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        first = Path(argv[0])
        package = Path(__file__).resolve().parent
        if first.suffix == ".py" and first.resolve().is_relative_to(package):
            module = first.resolve().relative_to(package.parent).with_suffix("").parts
            argv = ["python", "-m", ".".join(module), *argv[1:]]
        else:
            argv[0] = first.name
    return shlex.join(argv)


def provenance(
    checkpoints: str | Path | Sequence[str | Path] | None = None,
    argv: Sequence[str] | None = None,
) -> dict:
    """The provenance block: ``aad_med``, ``versions`` (python, torch, monai, numpy),
    ``command`` and ``checkpoints`` (``[{"path", "sha256"}]``, empty without a checkpoint)."""
    if checkpoints is None:
        paths: list[Path] = []
    elif isinstance(checkpoints, str | Path):
        paths = [Path(checkpoints)]
    else:
        paths = [Path(c) for c in checkpoints]
    return {
        "aad_med": __version__,
        "versions": {
            "python": platform.python_version(),
            **{name: package_version(name) for name in PACKAGES},
        },
        "command": command_line(argv),
        "checkpoints": [
            {"path": str(p.resolve()), "sha256": file_digest(p) if p.is_file() else None}
            for p in paths
        ],
    }
