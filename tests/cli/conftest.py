"""Shared by the console-script tests: a tiny untrained checkpoint in ``aad-train``'s format and
a way to run a console script as users do (a subprocess, quiet, one thread)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.models import ConvAutoencoder
from aad_med.training.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, save_checkpoint

TINY_PATCH = 8

CLI_ENV = {
    **os.environ,
    "AAD_MED_VERBOSE": "0",
    "HYDRA_FULL_ERROR": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MPLBACKEND": "Agg",
}


def write_tiny_checkpoint(path: Path, seed: int = 0, **preprocessing: object) -> Path:
    """An untrained (4, 8)-channel autoencoder on 8³ patches, saved as ``aad-train`` saves it.

    Untrained weights are enough where only the input checks or the determinism of the
    pipeline matter; ``preprocessing`` overrides fields of the recorded preprocessing.
    """
    torch.manual_seed(seed)
    model = ConvAutoencoder(
        channels=(4, 8), strides=(2, 2), latent_dim=4, patch_size=TINY_PATCH, num_res_units=0
    )
    pre = PreprocessingConfig(patch_size=TINY_PATCH, min_brain_fraction=0.25).to_dict()
    pre.update(preprocessing)
    return save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_state": model.state_dict(),
            "model_config": model.model_config(),
            "preprocessing": pre,
            "train_subject_ids": [],
            "train_subjects": [],
        },
    )


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
