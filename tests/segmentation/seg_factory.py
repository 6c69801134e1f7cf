"""Tiny synthetic cohorts for the segmentation tests (24³ volumes, a few subjects); a plain module
imported by the tests, not a conftest (see tests/pipelines/transfer_factory.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aad_med.data.synthetic import generate_cohort
from aad_med.data.validation import load_cohort

SHAPE = (24, 24, 24)


@pytest.fixture(scope="session")
def seg_cohort(tmp_path_factory) -> Path:
    """4 reference subjects with tumours."""
    return generate_cohort(tmp_path_factory.mktemp("seg") / "ref", 4, "reference", 0, SHAPE)


@pytest.fixture(scope="session")
def seg_records(seg_cohort):
    return load_cohort(seg_cohort).subjects
