"""A tiny reference cohort (8 subjects of 32x36x28) and a tiny checkpoint trained on separate
subjects, shared by the calibration tests of this folder."""

from __future__ import annotations

import pytest
from checkpoint_factory import train_tiny_checkpoint

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.synthetic import generate_cohort

SHAPE = (32, 36, 28)
PATCH = 16


@pytest.fixture(scope="session")
def calib_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("calibration_data")
    generate_cohort(root / "train", 6, "reference", seed=100, shape=SHAPE, id_prefix="Train_")
    generate_cohort(root / "reference", 8, "reference", seed=3, shape=SHAPE, id_prefix="Ref_")
    pre = PreprocessingConfig(patch_size=PATCH, min_brain_fraction=0.25, eval_stride=8)
    ckpt = train_tiny_checkpoint(root / "ckpt.pt", root / "train", pre, epochs=4)
    return {"root": root, "ckpt": ckpt, "reference": root / "reference", "preprocessing": pre}
