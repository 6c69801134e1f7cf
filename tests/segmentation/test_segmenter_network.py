"""The segmentation network (aad_med.segmentation.network): shapes, impossible settings, and a
checkpoint round trip through the project's safe checkpoint format."""

from __future__ import annotations

import pytest
import torch

from aad_med.errors import CheckpointError, ConfigError
from aad_med.segmentation.network import (
    SegmenterConfig,
    build_segmenter,
    check_patch_size,
    load_segmenter,
)
from aad_med.training.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, save_checkpoint

TINY = {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}


@pytest.mark.parametrize(
    "config, regions",
    [
        (SegmenterConfig(**TINY), 3),
        (SegmenterConfig(regions=("WT",), **TINY), 1),
        (SegmenterConfig(architecture="segresnet", init_filters=8, regions=("WT", "ET")), 2),
    ],
    ids=["unet_3", "unet_wt", "segresnet_2"],
)
def test_output_has_one_channel_per_region(config, regions):
    model = build_segmenter(config)
    out = model(torch.zeros(2, 4, 16, 16, 16))
    assert out.shape == (2, regions, 16, 16, 16)


def test_impossible_settings_are_refused():
    with pytest.raises(ConfigError, match="strides"):
        SegmenterConfig(channels=(4, 8, 16), strides=(2,))
    with pytest.raises(ConfigError, match="architecture"):
        SegmenterConfig(architecture="vnet")
    with pytest.raises(ConfigError, match="multiple of 8"):
        SegmenterConfig(architecture="segresnet", init_filters=4)
    with pytest.raises(ConfigError, match="multiple of 4"):
        check_patch_size(SegmenterConfig(**TINY), 18)
    check_patch_size(SegmenterConfig(**TINY), 20)


def _save(path, model, **extra):
    return save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_state": model.state_dict(),
            "preprocessing": {"patch_size": 16},
            **extra,
        },
    )


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter(SegmenterConfig(regions=("WT", "TC"), **TINY)).eval()
    path = _save(tmp_path / "seg.pt", model, model_config=model.model_config())
    loaded, ckpt = load_segmenter(path)
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert loaded.regions == ("WT", "TC") and not loaded.training


def test_autoencoder_checkpoint_is_not_a_segmenter(tmp_path):
    from checkpoint_factory import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "ae.pt")
    with pytest.raises(CheckpointError, match="not a segmenter"):
        load_segmenter(path)
