"""MRIQC-style image-quality metrics: hand-computed values on a constructed volume, and the
direction each metric moves under noise, blur and a bias field."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from aad_med import CHANNELS
from aad_med.data.quality import (
    METRICS,
    cohort_quality,
    image_quality,
    subject_quality,
    tissue_classes,
)

SHAPE = (40, 40, 40)


def _phantom(noise: float = 2.0, seed: int = 0):
    """A sphere 'brain': WM core (T1 100), GM shell (60), CSF rim (20); zero outside."""
    idx = np.indices(SHAPE) - (np.array(SHAPE)[:, None, None, None] - 1) / 2
    r = np.sqrt((idx**2).sum(0))
    truth = np.zeros(SHAPE, np.uint8)
    truth[r < 18] = 1
    truth[r < 15] = 2
    truth[r < 10] = 3
    mask = truth > 0
    img = np.choose(truth, [0.0, 20.0, 60.0, 100.0])
    rng = np.random.default_rng(seed)
    img = np.where(mask, img + noise * rng.standard_normal(SHAPE), 0.0)
    return img, mask, truth


def test_tissue_classes_recover_the_phantom_and_skip_tumour():
    img, mask, truth = _phantom()
    lab = tissue_classes(img, mask)
    assert np.array_equal(lab, truth)
    seg = np.zeros(SHAPE, np.int16)
    seg[18:22, 18:22, 18:22] = 4
    lab = tissue_classes(img, mask, seg)
    assert np.all(lab[seg > 0] == 0) and np.array_equal(lab[seg == 0], truth[seg == 0])


def test_values_on_a_constructed_volume_match_hand_calculation():
    # Classes of 8 voxels each, values mu +- a alternating: mean mu, population std a.
    img = np.zeros((4, 4, 4))
    tissues = np.zeros((4, 4, 4), np.uint8)
    tissues[0], tissues[1], tissues[2] = 1, 2, 3  # 16 voxels each
    signs = np.where(np.indices((4, 4)).sum(0) % 2 == 0, 1.0, -1.0)
    for c, (mu, a) in {1: (20.0, 2.0), 2: (60.0, 3.0), 3: (100.0, 4.0)}.items():
        img[c - 1] = mu + a * signs
    mask = tissues > 0
    m, notes = image_quality(img, mask, tissues)
    corr = math.sqrt(16 / 15)
    assert m["snr_csf"] == pytest.approx(20 / (2 * corr))
    assert m["snr_gm"] == pytest.approx(60 / (3 * corr))
    assert m["snr_wm"] == pytest.approx(100 / (4 * corr))
    assert m["snr_total"] == pytest.approx((10 + 20 + 25) / 3 / corr)
    assert m["cnr"] == pytest.approx(40 / 5)  # |60 - 100| / sqrt(9 + 16)
    assert m["cjv"] == pytest.approx(7 / 40)
    x = img[mask]
    b = np.sqrt((x**2).sum())
    efc = (x / b * np.log(x / b)).sum() / (np.sqrt(48) * np.log(1 / np.sqrt(48)))
    assert m["efc"] == pytest.approx(efc)
    assert m["wm2max"] == pytest.approx(100 / np.percentile(x, 99.95))
    assert m["inu_range"] == pytest.approx(0.0, abs=0.06)  # +-4 checkerboard smoothed flat
    assert math.isnan(m["fber"]) and "skull-stripped" in notes["fber"]
    assert set(m) == set(METRICS)


def test_fber_is_computed_when_the_background_is_not_zero():
    img, mask, truth = _phantom()
    bg = np.where(mask, 0.0, 2.0)
    m, notes = image_quality(img + bg, mask, truth)
    assert m["fber"] == pytest.approx(np.mean(img[mask] ** 2) / 4.0)
    assert "fber" not in notes


def test_noise_lowers_snr_and_cnr_and_raises_cjv():
    low, mask, truth = _phantom(noise=2.0)
    high, _, _ = _phantom(noise=10.0)
    m_low, _ = image_quality(low, mask, truth)
    m_high, _ = image_quality(high, mask, truth)
    for key in ("snr_wm", "snr_gm", "snr_total", "cnr"):
        assert m_high[key] < 0.5 * m_low[key], key
    assert m_high["cjv"] > 2 * m_low["cjv"]


def test_blur_raises_efc():
    img, mask, truth = _phantom(noise=5.0)
    blurred = np.where(mask, ndimage.gaussian_filter(img, 2.0), 0.0)
    m, _ = image_quality(img, mask, truth)
    m_blur, _ = image_quality(blurred, mask, truth)
    # Smoothing spreads energy evenly over the brain: entropy up, closer to uniform (1).
    assert m["efc"] < m_blur["efc"] < 1.0


def test_bias_field_raises_inu_range():
    img, mask, truth = _phantom(noise=2.0)
    x = np.linspace(-1, 1, SHAPE[0])[:, None, None]
    biased = img * (1 + 0.3 * x)
    m, _ = image_quality(img, mask, truth)
    m_bias, _ = image_quality(biased, mask, truth)
    assert m["inu_range"] < 0.05
    # The true field spans about 0.25 over the WM core; the smoothing attenuates it somewhat.
    assert m_bias["inu_range"] > 0.1
    assert m_bias["cjv"] > m["cjv"]


def test_bad_shapes_raise():
    img, mask, truth = _phantom()
    with pytest.raises(ValueError, match="one 3-D grid"):
        image_quality(img[:-1], mask, truth)
    with pytest.raises(ValueError, match="empty"):
        image_quality(img, np.zeros(SHAPE, bool), truth)
    with pytest.raises(ValueError, match="distinct"):
        tissue_classes(np.ones(SHAPE), mask)


def test_subject_quality_reads_a_synthetic_subject(tmp_path):
    from aad_med.data.synthetic import generate_cohort
    from aad_med.data.validation import load_cohort

    generate_cohort(tmp_path / "c", n_subjects=2, shape=(40, 44, 36), seed=3)
    records = load_cohort(tmp_path / "c").subjects
    m, notes = subject_quality(records[0])
    columns, values, all_notes = cohort_quality(records)
    assert values.shape == (2, len(columns)) and all_notes[0] == notes
    np.testing.assert_array_equal(values[0], [m[c] for c in columns])
    assert set(m) == {f"{ch}_{k}" for ch in CHANNELS for k in METRICS}
    assert math.isnan(m["t1_fber"]) and "t1_fber" in notes
    # T1 tissue order: CSF < GM < WM, so the T1 WM/GM contrast is finite and positive.
    assert m["t1_cnr"] > 0.5 and 0 < m["t1_wm2max"] <= 1
    assert all(math.isfinite(v) for k, v in m.items() if not k.endswith("fber"))


def _full_frame_field(image, mask, wm):
    """The INU field as first written: both Gaussians over the whole frame, every voxel."""
    idx = np.argwhere(mask)
    sigma = max(int((idx.max(0) - idx.min(0) + 1).max()) / 8.0, 1.0)
    w = wm.astype(np.float64)
    num = ndimage.gaussian_filter(image * w, sigma, mode="constant")
    den = ndimage.gaussian_filter(w, sigma, mode="constant")
    return num[wm] / den[wm]


def _smoothing(mask, wm):
    from aad_med.data.quality import WMSmoothing, inu_sigma

    return WMSmoothing(mask.shape, np.flatnonzero(wm), inu_sigma(mask))


@pytest.mark.parametrize("touch_edge", [False, True])
def test_inu_field_of_a_small_brain_is_bit_identical_to_the_full_frame(touch_edge):
    img, mask, truth = _phantom(noise=5.0, seed=3)
    rng = np.random.default_rng(1)
    wm = (truth == 3) & (rng.random(SHAPE) < 0.8)  # ragged, off-centre WM
    wm[:, :14] = False
    img = img * (1 + 0.3 * np.linspace(0, 1, SHAPE[0]))[:, None, None] - 7.0 * mask
    if touch_edge:
        mask = mask | (np.indices(SHAPE)[2] == SHAPE[2] - 1)
        wm[25:30, 20:25, -3:] = True
    s = _smoothing(mask, wm)
    assert s.factor == 1  # s = 36/8 < 8: no coarse grid
    assert np.array_equal(s.field(img[wm]), _full_frame_field(img, mask, wm))


def _large_phantom(bias: float, shape=(96, 100, 90), seed: int = 0):
    """An ellipsoid brain of up to 90 voxels (s = 11.25, blocks of 2), WM core, tilted bias field."""
    idx = np.indices(shape) - (np.array(shape)[:, None, None, None] - 1) / 2
    r = np.sqrt(((idx / np.array([40, 45, 38])[:, None, None, None]) ** 2).sum(0))
    truth = np.choose(np.digitize(r, [0.55, 0.8, 1.0]), [3, 2, 1, 0]).astype(np.uint8)
    mask = truth > 0
    rng = np.random.default_rng(seed)
    field = np.exp(bias * (idx[0] / 48 + 0.5 * (idx[2] / 45) ** 2))
    img = np.choose(truth, [0.0, 20.0, 60.0, 100.0]) * field + 3 * rng.standard_normal(shape)
    return np.where(mask, img, 0.0), mask, truth


def _inu(field):
    p5, med, p95 = np.percentile(field, [5, 50, 95])
    return (p95 - p5) / med


@pytest.mark.parametrize("bias", [0.0, 0.2, 0.6])
def test_coarse_inu_field_is_close_to_the_exact_convolution(bias):
    img, mask, truth = _large_phantom(bias)
    wm = truth == 3
    s = _smoothing(mask, wm)
    assert s.factor == 2 and s.sigma == pytest.approx(90 / 8)  # the 90-voxel edge
    exact = _full_frame_field(img, mask, wm)
    coarse = s.field(img[wm])
    # The field itself within 0.2 % of the exact one at every WM voxel...
    np.testing.assert_allclose(coarse, exact, rtol=2e-3)
    # ...and the metric within 2 % (or 0.002 on a flat field, where it is all noise).
    assert _inu(coarse) == pytest.approx(_inu(exact), rel=0.02, abs=2e-3)


def test_stronger_bias_gives_larger_inu_range_on_the_coarse_grid():
    values = []
    for bias in (0.0, 0.1, 0.2, 0.4, 0.8):
        img, mask, truth = _large_phantom(bias)
        m, _ = image_quality(img, mask, truth)
        values.append(m["inu_range"])
    assert values[0] < 0.01 and all(np.diff(values) > 0), values


def test_sorted_percentiles_equal_numpy():
    from aad_med.data.quality import _percentiles_of_sorted

    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 1000, 12345):
        x = np.sort(rng.normal(100, 30, n))
        q = [0, 5, 16.6, 50, 95, 99.95, 100]
        np.testing.assert_array_equal(_percentiles_of_sorted(x, q), np.percentile(x, q))


def _lloyd_reference(x, n_iter=100):
    """The k-means as first written: a pass over every value per iteration."""
    centres = np.quantile(x, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(n_iter):
        lab = np.searchsorted((centres[:-1] + centres[1:]) / 2, x)
        new = np.array([x[lab == c].mean() if np.any(lab == c) else centres[c] for c in range(3)])
        if np.allclose(new, centres, rtol=0, atol=1e-9 * (1 + np.abs(centres).max())):
            break
        centres = np.sort(new)
    return np.searchsorted((centres[:-1] + centres[1:]) / 2, x) + 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_classes_equal_the_per_voxel_lloyd(seed):
    rng = np.random.default_rng(seed)
    t1 = np.concatenate(
        [rng.normal(m, s, n) for m, s, n in ((30, 10, 3000), (70, 12, 5000), (110, 8, 4000))]
    )
    t1 = np.round(rng.permutation(t1)).reshape(12, 20, 50)  # integer-valued, ties on the cuts
    mask = np.ones(t1.shape, bool)
    mask[0] = False
    lab = tissue_classes(t1, mask)
    assert np.array_equal(lab[mask], _lloyd_reference(t1[mask]))
    assert np.all(lab[~mask] == 0)


def test_sample_stride_and_the_sampled_metrics_stay_close():
    from aad_med.data.quality import quality_of_arrays, sample_stride

    assert sample_stride((128, 128, 128)) == 1
    assert sample_stride((129, 128, 128)) == 2
    assert sample_stride((240, 240, 155)) == 2
    img, mask, truth = _large_phantom(0.3)
    image = np.stack([img * (1 + 0.3 * k) for k in range(4)]).astype(np.float32)
    seg = np.zeros(img.shape, np.int16)
    seg[40:50, 45:55, 40:50] = 2
    full, _ = quality_of_arrays(image, seg, stride=1)
    sampled, notes = quality_of_arrays(image, seg, stride=2)
    for key, value in full.items():
        if key.endswith("fber"):
            assert math.isnan(sampled[key]) and key in notes
        elif key.endswith("efc"):  # counts each grid voxel 8 times: same N, same scale
            assert sampled[key] == pytest.approx(value, rel=1e-3), key
        else:
            assert sampled[key] == pytest.approx(value, rel=0.03, abs=1e-3), key


def test_efc_counts_a_grid_voxel_for_the_voxels_it_stands_for():
    from aad_med.data.quality import _efc

    rng = np.random.default_rng(3)
    x = rng.gamma(4.0, 25.0, 5000)
    x[:50] = 0.0
    y = x / np.sqrt((x**2).sum())
    n = x.size
    expected = (y[y > 0] * np.log(y[y > 0])).sum() / (np.sqrt(n) * np.log(1 / np.sqrt(n)))
    assert _efc(x) == pytest.approx(expected, rel=1e-12)
    # Each value repeated 8 times is the same image at 8x the voxels: scale=8 gives its EFC.
    assert _efc(x, 8) == pytest.approx(_efc(np.repeat(x, 8)), rel=1e-12)


def test_subject_quality_shares_one_smoothing_and_equals_per_channel_calls():
    from aad_med.data.quality import QUALITY_COLUMNS, quality_of_arrays, quality_row

    img, mask, truth = _phantom(noise=3.0, seed=4)
    rng = np.random.default_rng(2)
    image = np.stack([img * (1 + 0.2 * k) + rng.normal(0, 1, SHAPE) * mask for k in range(4)])
    image = image.astype(np.float32)
    metrics, _ = quality_of_arrays(image, None)
    brain = np.any(image != 0, axis=0)
    tissues = tissue_classes(image[CHANNELS.index("t1")], brain)
    for c, ch in enumerate(CHANNELS):
        alone, _ = image_quality(image[c], brain, tissues)
        for k in METRICS:
            assert metrics[f"{ch}_{k}"] == alone[k] or (
                math.isnan(alone[k]) and math.isnan(metrics[f"{ch}_{k}"])
            )
    row, problem = quality_row(image, None)
    assert problem is None and row.shape == (len(QUALITY_COLUMNS),)
    assert row[QUALITY_COLUMNS.index("flair_inu_range")] == metrics["flair_inu_range"]
    empty, problem = quality_row(np.zeros_like(image), None)
    assert np.isnan(empty).all() and ("empty" in problem or "distinct" in problem)
