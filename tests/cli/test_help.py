"""Each command explains itself: ``--help`` starts with a usage line and one example and lists
only the config groups that command reads (its primary config's defaults); every console script
answers ``--version``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

import aad_med
from aad_med.resources import CONFIG_DIR


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AAD_MED_VERBOSE": "0"}
    return subprocess.run(
        [sys.executable, "-m", f"aad_med.cli.{module}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def default_groups(config: str) -> set[str]:
    """Groups named in a primary config's defaults list (``hydra`` is Hydra's own)."""
    doc = yaml.safe_load((CONFIG_DIR / f"{config}.yaml").read_text())
    groups = set()
    for entry in doc["defaults"]:
        if isinstance(entry, dict):
            groups.update(k.split("/")[0].removeprefix("override ") for k in entry)
    return groups - {"hydra"}


@pytest.mark.parametrize(
    ("module", "config"),
    [
        ("compare", "compare"),
        ("calibrate", "calibrate"),
        ("train", "train"),
        ("transfer", "transfer"),
    ],
)
def test_help_has_usage_example_and_only_its_groups(module, config):
    proc = run(module, "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"usage: aad-{module} ")
    assert lines[2] == "example:" and lines[3].strip().startswith(f"aad-{module} ")
    section = proc.stdout.split("== Config groups (group=option) ==")[1].split("==")[0]
    listed = {m.group(1) for m in re.finditer(r"^(\w+): ", section, flags=re.M)}
    assert listed == default_groups(config)
    # Each listed group's options are the files of that group.
    for line in section.strip().splitlines():
        group, options = line.split(": ")
        files = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert options.split(", ") == files, group


@pytest.mark.parametrize(
    "module",
    ["synth", "inspect", "train", "compare", "calibrate", "embed", "reference", "transfer"],
)
def test_every_command_answers_version(module):
    proc = run(module, "--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"aad-{module} {aad_med.__version__}"
