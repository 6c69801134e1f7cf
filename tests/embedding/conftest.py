"""Tiny cohorts, a tiny untrained autoencoder and its preprocessing for the embedding tests."""

from __future__ import annotations

import pytest
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.validation import load_cohort
from aad_med.models import ConvAutoencoder
from tests.nifti_factory import write_brats_cohort

PATCH = 8


@pytest.fixture
def preprocessing() -> PreprocessingConfig:
    return PreprocessingConfig(patch_size=PATCH, min_brain_fraction=0.25)


@pytest.fixture
def model() -> ConvAutoencoder:
    torch.manual_seed(0)
    return ConvAutoencoder(
        channels=(4, 8),
        strides=(2, 2),
        latent_dim=6,
        patch_size=PATCH,
        num_res_units=0,
        norm="BATCH",
    ).eval()


@pytest.fixture
def cohorts(tmp_path):
    a = write_brats_cohort(tmp_path / "siteA", n=3)
    b = write_brats_cohort(tmp_path / "siteB", n=2, scale=1.5)
    return {"siteA": load_cohort(a), "siteB": load_cohort(b)}
