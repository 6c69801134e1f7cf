"""Shared by the console-script tests: a tiny untrained checkpoint in ``aad-train``'s format
(``checkpoint_factory.write_tiny_checkpoint``) and a way to run a console script as users do (a
subprocess, quiet, one thread)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_factory import write_tiny_checkpoint

CLI_ENV = {
    **os.environ,
    "AAD_MED_VERBOSE": "0",
    "HYDRA_FULL_ERROR": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt") / "ckpt.pt")


def run_cli(
    module: str, args: list[str | Path], timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """``python -m aad_med.cli.<module> args...``: what the console script of that name runs."""
    return subprocess.run(
        [sys.executable, "-m", f"aad_med.cli.{module}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**CLI_ENV, **env},
    )
