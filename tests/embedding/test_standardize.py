"""The fixed feature scale (embedding/standardize.py): robust per-block centre and scale, a
per-subject map that does not depend on the other cohorts, and a reference that survives a
weights_only checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aad_med import DEFAULT_FEATURES
from aad_med.embedding import embed_cohorts, get_feature_set
from aad_med.embedding.standardize import (
    MAD_TO_SD,
    REFERENCE_BLOCKS,
    SCALE_FLOOR,
    apply_block,
    fit_block,
    fit_reference,
    missing_blocks,
    reference_from_subjects,
)
from aad_med.errors import ConfigError
from aad_med.training.checkpoint import save_checkpoint


def test_fit_block_is_median_and_mad_with_sd_fallback_floor_and_constant_columns():
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [
            rng.normal(5.0, 2.0, 41),  # ordinary column
            np.r_[np.zeros(40), 1000.0],  # MAD 0 (all but one equal): the SD is used
            np.full(41, 3.0),  # constant: dropped
            rng.normal(0.0, 1e-6, 41),  # tiny spread: floored
        ]
    )
    x[0, 0] = 1e6  # one wild subject moves neither median nor MAD much
    b = fit_block(x)
    assert b["width"] == 4 and b["n_subjects"] == 41
    assert b["keep"] == [True, True, False, True]
    assert b["mean"][0] == pytest.approx(np.median(x[:, 0]))
    mad = MAD_TO_SD * np.median(np.abs(x[:, 0] - np.median(x[:, 0])))
    assert b["scale"][0] == pytest.approx(mad) and 1.3 < b["scale"][0] < 2.7
    assert b["scale"][1] == pytest.approx(x[:, 1].std())
    # Floor: SCALE_FLOOR x the median scale of the varying columns (here column 0's).
    assert b["scale"][3] == pytest.approx(SCALE_FLOOR * mad)
    z = apply_block(x, b)
    assert np.all(z[:, 2] == 0.0) and np.isfinite(z).all()
    # Plain floats, so a checkpoint with it loads with weights_only=True.
    assert all(type(v) is float for v in b["mean"] + b["scale"])
    with pytest.raises(ConfigError, match="has 4 columns but the vectors have 3"):
        apply_block(x[:, :3], b, "multiscale")
    with pytest.raises(ValueError, match="at least 2 subjects"):
        fit_block(x[:1])


def test_finalize_with_a_reference_maps_each_subject_alone(model, cohorts, preprocessing):
    from aad_med.data.records import Cohort

    fs = get_feature_set(DEFAULT_FEATURES)
    pooled = [s for c in cohorts.values() for s in c.subjects]
    ref = reference_from_subjects(
        model, Cohort(path=cohorts["siteA"].path, layout="x", subjects=pooled), preprocessing
    )
    # Every block (intensity_variation only where the volumes have 5 mostly-brain patches).
    assert set(REFERENCE_BLOCKS) - {"intensity_variation"} <= set(ref["blocks"])
    assert ref["n_subjects"] == 5 and not missing_blocks(fs, ref)
    fs.reference = ref
    both = embed_cohorts(model, cohorts, preprocessing, features=fs, progress=False)
    alone = embed_cohorts(
        model, {"siteA": cohorts["siteA"]}, preprocessing, features=fs, progress=False
    )
    # With the fixed scale siteA's vectors are the same with or without siteB in the call ...
    np.testing.assert_allclose(alone["siteA"].vectors, both["siteA"].vectors, rtol=0, atol=1e-12)
    plain = get_feature_set(DEFAULT_FEATURES)
    pooled_both = embed_cohorts(model, cohorts, preprocessing, features=plain, progress=False)
    pooled_alone = embed_cohorts(
        model, {"siteA": cohorts["siteA"]}, preprocessing, features=plain, progress=False
    )
    # Without it (pooled) they are not: the company changes the numbers (the bug).
    assert not np.allclose(pooled_alone["siteA"].vectors, pooled_both["siteA"].vectors)
    # The reference round-trips through a weights_only checkpoint.
    path = save_checkpoint(cohorts["siteA"].path.parent / "ck.pt", {"feature_reference": ref})
    back = torch.load(path, weights_only=True)["feature_reference"]
    assert back == ref


def test_combined_reference_weights_blocks_equally():
    rng = np.random.default_rng(1)
    fs = get_feature_set(DEFAULT_FEATURES)
    widths = [5, 3, 7]
    raw = fs.assemble(
        {p.name: rng.normal(size=(30, w)) * 10 for p, w in zip(fs.parts, widths, strict=True)}
    )
    ref = fit_reference(fs, raw, [f"s{i}" for i in range(30)])
    assert [ref["blocks"][p.name]["width"] for p in fs.parts] == widths
    out = fs.finalize({"x": raw}, reference=ref)["x"]
    start = 0
    for p, w in zip(fs.parts, widths, strict=True):
        block = out[:, start : start + w]
        expect = apply_block(fs.split(raw)[fs.parts.index(p)], ref["blocks"][p.name]) / np.sqrt(w)
        np.testing.assert_allclose(block, expect)
        start += w
    # An incomplete reference is not used (pooled standardisation instead, mean 0 over the call).
    partial = {"blocks": {k: v for k, v in ref["blocks"].items() if k != "intensity_shape"}}
    assert missing_blocks(fs, partial) == ["intensity_shape"]
    pooled = fs.finalize({"x": raw}, reference=partial)["x"]
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-12)
