"""The intensity_shape and intensity_variation feature blocks, on fabricated patch streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from aad_med.embedding import available_feature_sets, embed_cohorts, features, input_texture
from aad_med.embedding import intensity_shape as blocks
from aad_med.embedding.acquisition import ConcatFeatureSet
from aad_med.embedding.features import PatchBatch
from aad_med.embedding.intensity_shape import SHAPE_QUANTILES, VARIATION_QUANTILES

NQ = len(SHAPE_QUANTILES)


def _stream(model, values, cells, batch_size=4):
    """PatchBatch chunks of ``values`` ``(N, 4, p, p, p)`` at lattice ``cells`` ``(N, 3)``."""
    x = torch.as_tensor(values, dtype=torch.float32)
    pos = torch.as_tensor(np.asarray(cells) * model.patch_size, dtype=torch.int64)
    z = torch.zeros(len(x), 6)
    return [
        PatchBatch(model, x[s : s + batch_size], z[s : s + batch_size], pos[s : s + batch_size])
        for s in range(0, len(x), batch_size)
    ]


def _vector(name, batches):
    acc = {**blocks.FEATURE_SETS, **input_texture.FEATURE_SETS}[name]().accumulator()
    for b in batches:
        acc.add(b)
    return acc.vector()


def _cells(n):
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return grid[:n]


def test_shape_block_reads_quantiles_and_moments_of_the_foreground_only(model):
    rng = np.random.default_rng(0)
    p = model.patch_size
    x = rng.standard_normal((10, 4, p, p, p))
    x[:, :, : p // 2] = 0.0  # background half: must be ignored
    v = _vector("intensity_shape", _stream(model, x, _cells(10)))
    assert v.shape == (4 * (NQ + 2),)
    fg = x[:, 0][x[:, 0] != 0].astype(np.float32).astype(np.float64)  # as streamed
    np.testing.assert_allclose(v[:NQ], np.quantile(fg, SHAPE_QUANTILES), atol=0.02)
    assert v[NQ] == pytest.approx(stats.skew(fg), abs=1e-9)
    assert v[NQ + 1] == pytest.approx(stats.kurtosis(fg), abs=1e-9)
    # Batching does not change the vector.
    one = _vector("intensity_shape", _stream(model, x, _cells(10), batch_size=10))
    np.testing.assert_allclose(one, v, rtol=1e-9, atol=1e-12)


def test_shape_block_sees_a_gamma_change_that_z_scoring_keeps(model):
    """A gamma on positive intensities, then z-scored again, still changes skewness/quantiles."""
    rng = np.random.default_rng(1)
    p = model.patch_size
    raw = np.abs(2.0 + 0.6 * rng.standard_normal((12, 4, p, p, p)))

    def zscore(a):
        return (a - a.mean()) / a.std()

    v1 = _vector("intensity_shape", _stream(model, zscore(raw), _cells(12)))
    v2 = _vector("intensity_shape", _stream(model, zscore(raw**1.5), _cells(12)))
    assert v2[NQ] > v1[NQ] + 0.1  # more right-skewed
    assert abs(v2[SHAPE_QUANTILES.index(0.5)] - v1[SHAPE_QUANTILES.index(0.5)]) > 0.02
    # A global gain and offset (what z-scoring removes anyway) changes nothing.
    v3 = _vector("intensity_shape", _stream(model, zscore(3.0 * raw + 5.0), _cells(12)))
    np.testing.assert_allclose(v3, v1, atol=0.02)


def test_variation_block_sees_a_smooth_drift_across_patches(model):
    rng = np.random.default_rng(2)
    p = model.patch_size
    cells = _cells(27)
    flat = rng.standard_normal((27, 4, p, p, p)) * 0.3 + 1.0
    ramp = flat + 0.5 * cells[:, 0][:, None, None, None, None]  # drift along the first axis
    nq = len(VARIATION_QUANTILES)
    v_flat = _vector("intensity_variation", _stream(model, flat, cells)).reshape(4, nq + 1)
    v_ramp = _vector("intensity_variation", _stream(model, ramp, cells)).reshape(4, nq + 1)
    # Spread of the patch medians over patches: about 0.5 * sd(cell index) with the ramp.
    sd_cells = cells[:, 0].std()
    np.testing.assert_allclose(v_ramp[:, 1], 0.5 * sd_cells, rtol=0.05)
    assert np.all(v_flat[:, 1] < 0.05)
    # The linear trend explains the drift (R² near 1), not the flat volume's jitter.
    assert np.all(v_ramp[:, nq] > 0.95) and np.all(v_flat[:, nq] < 0.6)


def test_variation_block_skips_patches_with_little_brain_and_needs_five(model):
    rng = np.random.default_rng(3)
    p = model.patch_size

    def patches(n_full, n_sparse):
        x = rng.standard_normal((n_full + n_sparse, 4, p, p, p)) + 3.0
        x[n_full:, :, : 7 * p // 8] = 0.0  # 12.5% brain: skipped
        x[n_full:] += 100.0 * (x[n_full:] != 0)  # would dominate the spread if they counted
        return x

    with pytest.raises(ValueError, match="only 4 patch"):
        _vector("intensity_variation", _stream(model, patches(4, 4), _cells(8)))
    v = _vector("intensity_variation", _stream(model, patches(6, 4), _cells(10)))
    assert np.all(v.reshape(4, -1)[:, :3] < 1.0)


def test_blocks_combine_with_the_encoder_blocks(model, cohorts, preprocessing):
    fs = ConcatFeatureSet(["multiscale", "texture", blocks.IntensityShapeFeatures()])
    assert fs.name == "multiscale+texture+intensity_shape"
    res = embed_cohorts(model, cohorts, preprocessing, features=fs, progress=False)
    pooled = np.vstack([res["siteA"].vectors, res["siteB"].vectors])
    assert pooled.shape[0] == 5 and np.isfinite(pooled).all()
    # Jointly standardised blocks, each weighted to unit total variance over all subjects.
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-9)
    shape_cols = pooled[:, -4 * (NQ + 2) :]
    assert np.sum(shape_cols.var(axis=0)) == pytest.approx(1.0, rel=1e-6)


def test_register_makes_the_blocks_and_the_default_selectable(monkeypatch):
    from aad_med import DEFAULT_FEATURES

    # The package registers them (the report has their benchmark text); register() alone
    # does it again on a registry without them.
    assert DEFAULT_FEATURES in available_feature_sets()
    monkeypatch.setattr(
        features,
        "_REGISTRY",
        {k: v for k, v in features._REGISTRY.items() if "intensity" not in k},
    )
    assert "intensity_shape" not in available_feature_sets()
    blocks.register()
    input_texture.register()
    names = available_feature_sets()
    for combo in (*blocks.COMBINATIONS, *input_texture.COMBINATIONS):
        assert "+".join(combo) in names
    fs = features.get_feature_set("multiscale+input_texture+intensity_shape")
    assert [p.name for p in fs.parts] == ["multiscale", "input_texture", "intensity_shape"]


def test_input_texture_is_a_normalised_variogram_inside_the_brain(model):
    from scipy import ndimage

    rng = np.random.default_rng(5)
    p = model.patch_size
    white = rng.standard_normal((8, 4, p, p, p)) + 2.0
    v = _vector("input_texture", _stream(model, white, _cells(8))).reshape(4, 3)
    np.testing.assert_allclose(v, 1.0, atol=0.05)  # white noise: 1 at every lag
    smooth = ndimage.gaussian_filter(white, sigma=(0, 0, 1.5, 1.5, 1.5))
    vs = _vector("input_texture", _stream(model, smooth, _cells(8))).reshape(4, 3)
    assert np.all(vs[:, 0] < 0.5) and np.all(vs[:, 0] < vs[:, 1]) and np.all(vs[:, 1] < vs[:, 2])
    # Background pairs do not count: a brain outline against zeros changes nothing.
    cut = white.copy()
    cut[:, :, : p // 2] = 0.0
    vc = _vector("input_texture", _stream(model, cut, _cells(8))).reshape(4, 3)
    np.testing.assert_allclose(vc, 1.0, atol=0.08)
    # Gain-free.
    v3 = _vector("input_texture", _stream(model, 3.0 * white, _cells(8))).reshape(4, 3)
    np.testing.assert_allclose(v3, v, rtol=1e-6)


def _input_texture_add_as_first_written(acc, batch):
    """The variogram sums as first written (torch boolean indexing), kept to pin the faster
    numpy pair selection to the same float64 bits."""
    x = batch.patches.detach().to(torch.float64).cpu()
    moments = np.zeros((x.shape[1], 3))
    diffs = np.zeros((x.shape[1], len(input_texture.LAGS), 2))
    for c in range(x.shape[1]):
        v = x[:, c]
        m = v != 0
        moments[c] = [float(m.sum()), float(v.sum()), float((v * v).sum())]
        for li, k in enumerate(input_texture.LAGS):
            for axis in (1, 2, 3):
                if v.shape[axis] <= k:
                    continue
                n = v.shape[axis]
                hi, lo = v.narrow(axis, k, n - k), v.narrow(axis, 0, n - k)
                both = m.narrow(axis, k, n - k) & m.narrow(axis, 0, n - k)
                d = (hi - lo)[both]
                diffs[c, li] += [float((d * d).sum()), float(d.numel())]
    if acc.moments is None:
        acc.moments, acc.diffs = moments, diffs
    else:
        acc.moments += moments
        acc.diffs += diffs


def test_input_texture_sums_are_bit_identical_to_the_first_implementation():
    rng = np.random.default_rng(7)
    fast = input_texture.InputTextureAccumulator()
    slow = input_texture.InputTextureAccumulator()
    for shape in [(5, 4, 12, 12, 12), (3, 4, 12, 3, 12), (2, 4, 2, 12, 12)]:
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 3 + 1)
        x[x.abs() < 0.8] = 0  # ragged foreground
        batch = PatchBatch(None, x, None, None, None)
        fast.add(batch)
        _input_texture_add_as_first_written(slow, batch)
    assert np.array_equal(fast.moments, slow.moments) and np.array_equal(fast.diffs, slow.diffs)
    assert np.array_equal(fast.vector(), slow.vector())
