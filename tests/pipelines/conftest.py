"""Tiny cohorts and an encoder for the transfer pipeline tests: a 6-subject source
and three 3-subject targets (same site, noise, blur) at 24³, and an untrained tiny encoder."""

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
