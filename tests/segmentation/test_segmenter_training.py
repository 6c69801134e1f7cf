"""Training and scoring the segmenter (aad_med.segmentation.training / evaluation): the Dice
conventions checked with constant predictors, bootstrap summaries, and the project loop's
checkpoint and exact-resume guarantees carried over to the segmenter."""

from __future__ import annotations

import numpy as np
import pytest
import seg_factory
import torch
from torch import nn

from aad_med.data.datasets import build_eval_dataset
from aad_med.errors import ConfigError
from aad_med.segmentation import (
    SegmenterConfig,
    evaluate_cohort,
    load_segmenter,
    region_masks,
    summarize_scores,
    train_segmenter,
)
from aad_med.segmentation.evaluation import boundary_confidence
from aad_med.segmentation.training import SegmentationSettings, split_train_test

seg_cohort = seg_factory.seg_cohort  # the shared fixtures
seg_records = seg_factory.seg_records
TINY = SegmenterConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=0)


class _Constant(nn.Module):
    """A 'segmenter' predicting every voxel as inside (or outside) every region."""

    def __init__(self, logit: float, regions=("WT", "TC", "ET")):
        super().__init__()
        self.logit = logit
        self.regions = regions

    def forward(self, x):
        return torch.full((x.shape[0], len(self.regions), *x.shape[2:]), self.logit)


def _settings(**kw) -> SegmentationSettings:
    base = dict(network=TINY, patch_size=16, max_epochs=1, batch_size=4, samples_per_subject=2,
                device="cpu", progress=False)  # fmt: skip
    return SegmentationSettings(**{**base, **kw})


def test_dice_of_constant_predictions(seg_records):
    settings = _settings()
    everything = evaluate_cohort(_Constant(10.0), seg_records, settings.preprocessing)
    nothing = evaluate_cohort(_Constant(-10.0), seg_records, settings.preprocessing)
    assert everything.subject_ids == [r.subject_id for r in seg_records]
    ds = build_eval_dataset(seg_records, settings.preprocessing)
    for i in range(len(ds)):
        truth = region_masks(torch.as_tensor(ds[i]["seg"])[None])[0]
        voxels = truth[0].numel()
        # predicting the whole volume: Dice = 2|T| / (|T| + |V|)
        expected = [2 * float(t.sum()) / (float(t.sum()) + voxels) for t in truth]
        np.testing.assert_allclose(everything.dice[i], expected, rtol=1e-5)
    # predicting nothing scores 0 on every region that has tumour
    assert np.all(nothing.dice == 0.0)
    assert everything.score("WT").shape == (len(seg_records),)


def test_empty_region_scores_one_when_nothing_predicted(tmp_path):
    from aad_med.data.synthetic import generate_cohort
    from aad_med.data.validation import load_cohort

    healthy = load_cohort(generate_cohort(tmp_path / "h", 2, "healthy", 0, (24, 24, 24)))
    settings = _settings()
    scores = evaluate_cohort(_Constant(-10.0), healthy.subjects, settings.preprocessing, hd95=True)
    assert np.all(scores.dice == 1.0)
    assert scores.hd95 is not None and np.all(np.isnan(scores.hd95))


@pytest.mark.parametrize(
    "logit, confidence",
    [(10.0, 1.0), (0.0, 0.0), (-10.0, 1.0)],  # sure inside / p = 0.5 everywhere / sure outside
)
def test_task_features_read_the_models_confidence(seg_records, logit, confidence):
    settings = _settings()
    scores = evaluate_cohort(
        _Constant(logit), seg_records, settings.preprocessing, task_features=True
    )
    assert set(scores.features) == {"confidence"}
    assert scores.features["confidence"].shape == (len(seg_records), 3)
    np.testing.assert_allclose(scores.features["confidence"], confidence, atol=1e-3)
    plain = evaluate_cohort(_Constant(logit), seg_records, settings.preprocessing)
    assert plain.features is None
    np.testing.assert_array_equal(plain.dice, scores.dice)


def test_boundary_confidence_is_read_where_the_model_sees_tumour():
    logits = torch.full((2, 4, 4, 4), -10.0)  # region 0: nothing; region 1: a boundary band
    logits[1, :2] = 10.0  # sure tumour: confidence ~1
    logits[1, 2] = 0.0  # p = 0.5: confidence 0
    # region 1: 32 sure voxels and 16 unsure ones among the 48 with p > 0.1
    np.testing.assert_allclose(boundary_confidence(logits), [1.0, 32 / 48], atol=1e-3)


def test_summary_interval():
    x = np.array([0.6, 0.7, 0.8, 0.9, 0.75, 0.65])
    s = summarize_scores(x, n_bootstrap=500, seed=1)
    assert s["n"] == 6 and s["mean"] == pytest.approx(x.mean())
    assert s["ci95"][0] < s["mean"] < s["ci95"][1]
    assert x.min() <= s["ci95"][0] and s["ci95"][1] <= x.max()
    assert summarize_scores([0.5])["ci95"] == [0.5, 0.5]
    with pytest.raises(ConfigError):
        summarize_scores([])
    with pytest.raises(ConfigError):
        summarize_scores([0.5, float("nan")])


def test_split_is_seeded_and_disjoint():
    train, test = split_train_test(10, 0.3, seed=0)
    assert len(test) == 3 and sorted(train + test) == list(range(10))
    assert split_train_test(10, 0.3, seed=0) == (train, test)
    assert split_train_test(2, 0.9, 0) == ([1], [0]) or len(split_train_test(2, 0.9, 0)[0]) == 1
    with pytest.raises(ConfigError):
        split_train_test(1, 0.5, 0)


def test_settings_refuse_inconsistent_values():
    with pytest.raises(ConfigError, match="multiple"):
        _settings(patch_size=18)
    with pytest.raises(ConfigError, match="score_region"):
        SegmentationSettings(
            network=SegmenterConfig(regions=("WT",), **_tiny_net()),
            score_region="ET",
            patch_size=16,
        )
    with pytest.raises(ConfigError, match="test_fraction"):
        _settings(test_fraction=1.0)


def _tiny_net():
    return {"channels": (4, 8, 16), "strides": (2, 2), "num_res_units": 0}


def test_training_writes_checkpoints_and_resumes_exactly(seg_records, tmp_path):
    straight, result = train_segmenter(seg_records, _settings(max_epochs=2), tmp_path / "a")
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_loss"])
    last = tmp_path / "a" / "checkpoints" / "last.pt"
    loaded, ckpt = load_segmenter(last)
    assert ckpt["epoch"] == 2 and ckpt["label_convention"] == "brats"
    assert ckpt["train_subject_ids"] == [r.subject_id for r in seg_records]
    # stop after one of two epochs, then resume: the same weights as two epochs straight
    _, first = train_segmenter(
        seg_records, _settings(max_epochs=2, epochs_per_run=1), tmp_path / "b"
    )
    assert first.epochs_run == 1
    resumed, _ = train_segmenter(
        seg_records,
        _settings(max_epochs=2, resume=str(tmp_path / "b" / "checkpoints" / "last.pt")),
        tmp_path / "b",
    )
    for (k, v), (_, w) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_training_needs_segmentations(seg_records, tmp_path):
    from dataclasses import replace

    unlabelled = [replace(r, seg=None) for r in seg_records]
    with pytest.raises(ConfigError, match="segmentation"):
        train_segmenter(unlabelled, _settings(), tmp_path)


@pytest.mark.gpu
def test_cuda_training_uses_bf16_and_scores(seg_records, tmp_path):
    model, result = train_segmenter(seg_records, _settings(device="cuda"), tmp_path)
    assert next(model.parameters()).is_cuda and np.isfinite(result.history[-1]["train_loss"])
    scores = evaluate_cohort(model, seg_records, _settings().preprocessing, device="cuda")
    assert scores.dice.shape == (len(seg_records), 3)
    assert np.all((scores.dice >= 0) & (scores.dice <= 1))
