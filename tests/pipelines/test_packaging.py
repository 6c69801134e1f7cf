"""The wheel holds every package and the configs: pyproject's package list matches the package
folders, and the configs resolve to one folder holding every command's primary config."""

from __future__ import annotations

from pathlib import Path

import tomllib

import aad_med
from aad_med.resources import CONFIG_DIR

ROOT = Path(aad_med.__file__).resolve().parents[1]


def test_pyproject_lists_every_package_folder():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "aad_med").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found | {"aad_med.configs"} == listed


def test_config_dir_holds_every_primary_config():
    for name in ("train", "compare", "calibrate"):
        assert (CONFIG_DIR / f"{name}.yaml").is_file()
    assert not (CONFIG_DIR / "calibration").exists()  # the group is `shifts`: no key collides
    assert (CONFIG_DIR / "shifts" / "quick.yaml").is_file()
