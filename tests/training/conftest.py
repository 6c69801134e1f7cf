"""Tiny cohorts and composed training configs for the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from aad_med.pipelines.rundir import register_resolvers
from aad_med.resources import CONFIG_DIR
from tests.nifti_factory import write_brats_cohort

AUGMENT = "{flip_prob:0.5,intensity_prob:0.5,intensity_scale:0.1,intensity_shift:0.1}"


def tiny_overrides(cohort: Path, data_dir: Path, **extra: object) -> list[str]:
    """CPU, 8^3 patches, a (4, 8)-channel model, no TensorBoard: seconds per run."""
    base = {
        "data.cohorts": f"[{cohort}]",
        "data.patch_size": 8,
        "data.samples_per_subject": 2,
        "data.val_fraction": 0.25,
        "data.num_workers": 0,
        "model.channels": "[4,8]",
        "model.strides": "[2,2]",
        "model.latent_dim": 4,
        "trainer": "cpu",
        "trainer.max_epochs": 2,
        "trainer.batch_size": 4,
        "trainer.progress": "false",
        "logger": "none",
        "paths.data_dir": str(data_dir),
        "paths.output_dir": str(data_dir / "outputs"),
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def compose_train(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides`` (Hydra's compose API)."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=return_hydra_config)


@pytest.fixture
def tiny_cohort(tmp_path) -> Path:
    """Five 24x28x20 BraTS-2021-layout subjects with segmentations."""
    return write_brats_cohort(tmp_path / "cohort", n=5)
