"""Tiny :class:`~aad_med.pipelines.transfer.TransferSettings` for the transfer tests: a small
UNet on 16³ patches, one epoch, CPU, few permutations and resamples."""

from __future__ import annotations


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
