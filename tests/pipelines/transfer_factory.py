"""Tiny inputs for the transfer pipeline tests: a 6-subject source and three 3-subject targets
(same site, noise, blur) at 24³ with an untrained tiny encoder (the ``transfer_data`` fixture),
and tiny :class:`~aad_med.pipelines.transfer.TransferSettings` (a small UNet on 16³ patches, one
epoch, CPU, few permutations and resamples). A plain module, not a conftest, so it never shadows
``tests/cli/conftest.py`` when both folders are collected together."""

from __future__ import annotations

from pathlib import Path

import pytest
from checkpoint_factory import write_tiny_checkpoint

from aad_med.data.synthetic import generate_cohort

SHAPE = (24, 24, 24)
TARGET_SITES = {"same": "reference", "noisy": "noise", "blurred": "blur"}


@pytest.fixture(scope="session")
def transfer_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer_data")
    paths = {"source": generate_cohort(root / "source", 6, "reference", 0, SHAPE)}
    for name, site in TARGET_SITES.items():
        paths[name] = generate_cohort(root / name, 3, site, 1, SHAPE, start_index=100)
    paths["encoder"] = write_tiny_checkpoint(root / "encoder.pt")
    return paths


def tiny_settings(**overrides):
    from aad_med.pipelines.transfer import TransferSettings
    from aad_med.segmentation.network import SegmenterConfig
    from aad_med.segmentation.training import SegmentationSettings

    seg = SegmentationSettings(
        network=SegmenterConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0),
        patch_size=16, max_epochs=1, samples_per_subject=2, device="cpu", progress=False,
        test_fraction=0.34,
    )  # fmt: skip
    base = dict(segmenter=seg, n_permutations=19, n_bootstrap=50, correlation_bootstrap=100,
                device="cpu")  # fmt: skip
    return TransferSettings(**{**base, **overrides})
