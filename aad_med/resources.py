"""Where the Hydra configs are: the one definition of :data:`CONFIG_DIR`.

The repository keeps ``configs/`` at the top level; the wheel ships the same folder as the
package ``aad_med.configs`` (``package-dir`` mapping in ``pyproject.toml``). Installed (wheel or
``pip install -e .``) the folder is found with :mod:`importlib.resources`. In a source checkout
(the ``aad_med`` package next to the project's ``pyproject.toml``) the checkout's own
``configs/`` wins, so a worktree on ``PYTHONPATH`` never reads the configs of another editable
install.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import aad_med


def _checkout_configs() -> Path | None:
    """``configs/`` of the source checkout ``aad_med`` was imported from, if it is one."""
    root = Path(aad_med.__file__).resolve().parents[1]
    project = root / "pyproject.toml"
    try:
        is_ours = 'name = "aad-med"' in project.read_text(encoding="utf-8")
    except OSError:
        return None
    found = root / "configs"
    return found if is_ours and (found / "train.yaml").is_file() else None


def config_dir() -> Path:
    """The folder holding ``train.yaml``, ``compare.yaml``, ``calibrate.yaml`` and the groups.

    Raises:
        FileNotFoundError: neither a source checkout nor an installed ``aad_med.configs``
            (an installation without its configs: reinstall aad-med).
    """
    checkout = _checkout_configs()
    if checkout is not None:
        return checkout
    if importlib.util.find_spec("aad_med.configs") is not None:
        found = Path(str(resources.files("aad_med.configs")))
        if (found / "train.yaml").is_file():
            return found
    raise FileNotFoundError(
        "aad-med's configs are missing: neither a source checkout's configs/ nor the installed "
        "package aad_med.configs holds train.yaml (reinstall aad-med)"
    )


CONFIG_DIR: Path = config_dir()
"""The config folder every command, test and notebook composes from."""
