"""BraTS regions from label maps (aad_med.segmentation.regions)."""

from __future__ import annotations

import pytest
import torch

from aad_med.errors import ConfigError
from aad_med.segmentation.regions import (
    REGIONS,
    convention_for_layout,
    region_masks,
    resolve_regions,
)


def _labels(values):
    return torch.tensor(values, dtype=torch.int16).reshape(1, 1, 1, len(values))


def test_brats_labels_make_nested_regions():
    seg = _labels([0, 1, 2, 3, 4])
    m = region_masks(seg, REGIONS, "brats")
    assert m.shape == (3, 1, 1, 5) and m.dtype == torch.float32
    assert m[0].flatten().tolist() == [0, 1, 1, 1, 1]  # WT: every tumour label
    assert m[1].flatten().tolist() == [0, 1, 0, 1, 1]  # TC: no oedema (2)
    assert m[2].flatten().tolist() == [0, 0, 0, 1, 1]  # ET: 4 (3 in BraTS 2023)


def test_decathlon_labels():
    seg = _labels([0, 1, 2, 3])
    m = region_masks(seg[None], ("ET", "WT"), "msd")  # batched input, channel order as asked
    assert m.shape == (1, 2, 1, 1, 4)
    assert m[0, 0].flatten().tolist() == [0, 0, 0, 1]
    assert m[0, 1].flatten().tolist() == [0, 1, 1, 1]
    assert convention_for_layout("msd") == "msd"
    assert convention_for_layout("brats2021") == "brats"


def test_region_names():
    assert resolve_regions("all") == REGIONS
    assert resolve_regions(["wt"]) == ("WT",)
    for bad in (["WT", "WT"], ["XX"], []):
        with pytest.raises(ConfigError):
            resolve_regions(bad)
    with pytest.raises(ConfigError):
        region_masks(_labels([0, 1]), ("WT",), "nnunet")
