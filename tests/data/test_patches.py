"""Patch stage (:mod:`aad_med.data.patches`): the evaluation grid, the random training sampler
and its cached look-up tables, on tiny preprocessed subjects."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from nifti_factory import write_subject

from aad_med.data.patches import (
    DEFAULT_AUGMENT,
    PATCH_KEYS,
    SAMPLING_KEYS,
    AddSamplingIndexd,
    RandBrainPatchd,
    eval_patch_grid,
    eval_patch_positions,
    extract_patches,
    train_transforms,
)
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.data.transforms import PREPROCESSED_KEYS, deterministic_transforms

CFG = PreprocessingConfig(patch_size=8, min_brain_fraction=0.5)


@pytest.fixture
def subject(tmp_path) -> SubjectRecord:
    return write_subject(tmp_path, "S0")


# ---------------------------------------------------------------------------------------------
# Evaluation grid


def _brain_volume(shape=(23, 27, 19)) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    return ((sum(g**2 for g in grids) / 0.8**2) < 1).to(torch.uint8)[None]


@pytest.mark.parametrize(("patch", "stride"), [(8, 8), (8, 5), (12, 7), (16, 16)])
def test_eval_grid_covers_every_brain_voxel(patch, stride):
    brain = _brain_volume()
    image = torch.randn(4, *brain.shape[1:]) * brain
    patches, pos = eval_patch_grid(image, brain, patch, stride, min_brain_fraction=0.0)
    assert patches.shape[1:] == (4, patch, patch, patch) and pos.dtype == torch.int64
    assert pos.shape == (patches.shape[0], 3)
    limits = torch.tensor(brain.shape[1:]) - patch
    assert torch.all(pos >= 0) and torch.all(pos <= limits)
    covered = torch.zeros(brain.shape[1:], dtype=torch.bool)
    for (x, y, z), pt in zip(pos.tolist(), patches, strict=True):
        torch.testing.assert_close(pt, image[:, x : x + patch, y : y + patch, z : z + patch])
        covered[x : x + patch, y : y + patch, z : z + patch] = True
    assert torch.all(covered[brain[0] > 0])
    # The last patch is aligned to the end of each axis.
    assert torch.equal(pos.max(0).values, limits)


def test_eval_grid_brain_fraction_filter_matches_brute_force():
    brain = _brain_volume()
    p, stride, frac = 8, 4, 0.6
    pos = eval_patch_positions(brain, p, stride, frac)
    kept = {tuple(v) for v in pos.tolist()}
    axes = [sorted(set(range(0, s - p + 1, stride)) | {s - p}) for s in brain.shape[1:]]
    for x, y, z in itertools.product(*axes):
        f = float(brain[0, x : x + p, y : y + p, z : z + p].float().mean())
        assert ((x, y, z) in kept) == (f >= frac), (x, y, z, f)
    assert len(kept) > 0


def test_eval_grid_keeps_the_best_patch_when_none_passes():
    brain = torch.zeros(1, 20, 20, 20, dtype=torch.uint8)
    brain[0, 17, 3, 11] = 1
    image = torch.randn(4, 20, 20, 20)
    patches, pos = eval_patch_grid(image, brain, 8, 8, min_brain_fraction=0.9)
    assert patches.shape == (1, 4, 8, 8, 8)
    x, y, z = pos[0].tolist()
    assert x <= 17 < x + 8 and y <= 3 < y + 8 and z <= 11 < z + 8


def test_eval_grid_rejects_too_small_volume_and_bad_stride():
    brain = torch.ones(1, 6, 10, 10)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        eval_patch_positions(brain, 8, 8, 0.0)
    with pytest.raises(ValueError, match="stride"):
        eval_patch_positions(torch.ones(1, 8, 8, 8), 8, 0, 0.0)


def test_extract_patches_are_copies():
    image = torch.arange(4 * 10 * 10 * 10, dtype=torch.float32).reshape(4, 10, 10, 10)
    patches = extract_patches(image, torch.tensor([[1, 2, 2]]), 4)
    patches += 1
    assert image[0, 1, 2, 2] == 122


def test_eval_grid_on_preprocessed_subject(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    patches, pos = eval_patch_grid(d["image"], d["brain"], 8, 8, 0.25)
    assert patches.shape[0] == pos.shape[0] >= 1
    assert patches.dtype == torch.float32


@pytest.mark.gpu
def test_eval_grid_on_cuda_matches_cpu():
    brain = _brain_volume()
    image = torch.randn(4, *brain.shape[1:]) * brain
    p_cpu, pos_cpu = eval_patch_grid(image, brain, 8, 5, 0.3)
    p_gpu, pos_gpu = eval_patch_grid(image.cuda(), brain.cuda(), 8, 5, 0.3)
    assert p_gpu.is_cuda and pos_gpu.is_cuda
    torch.testing.assert_close(p_gpu.cpu(), p_cpu)
    assert torch.equal(pos_gpu.cpu(), pos_cpu)


# ---------------------------------------------------------------------------------------------
# Training patches


def _brain_fraction(sample) -> float:
    return float(sample["brain"].float().mean())


def test_train_patches_shapes_and_brain_fraction(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    t = train_transforms(CFG, samples_per_subject=16).set_random_state(0)
    out = t(d)
    assert isinstance(out, list) and len(out) == 16
    for s in out:
        assert set(s) == set(PATCH_KEYS)
        assert s["image"].shape == (4, 8, 8, 8) and s["image"].dtype == torch.float32
        assert s["seg"].shape == (1, 8, 8, 8) and s["brain"].shape == (1, 8, 8, 8)
        assert _brain_fraction(s) >= CFG.min_brain_fraction
        x, y, z = s["patch_start"].tolist()
        assert s["patch_start"].dtype == torch.int64
        torch.testing.assert_close(s["image"], d["image"][:, x : x + 8, y : y + 8, z : z + 8])


def test_tumour_aware_sampling_share(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    n = 300
    out = train_transforms(CFG, n, tumour_ratio=0.3).set_random_state(1)(d)
    tumour = [s for s in out if s["patch_tumour"]]
    assert 0.2 * n < len(tumour) < 0.4 * n
    assert all(bool((s["seg"] > 0).any()) for s in tumour)
    none = train_transforms(CFG, 50, tumour_ratio=0.0).set_random_state(1)(d)
    assert not any(s["patch_tumour"] for s in none)


def test_no_tumour_patches_without_seg(tmp_path):
    rec = write_subject(tmp_path, "S0", with_seg=False)
    d = deterministic_transforms(CFG)(rec.as_dict())
    out = train_transforms(CFG, 20, tumour_ratio=1.0).set_random_state(0)(d)
    assert len(out) == 20 and not any(s["patch_tumour"] for s in out)
    assert all(_brain_fraction(s) >= CFG.min_brain_fraction for s in out)


def test_train_patches_seeded(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    t = train_transforms(CFG, 6, augment=DEFAULT_AUGMENT)
    a = torch.stack([s["image"] for s in t.set_random_state(3)(d)])
    b = torch.stack([s["image"] for s in t.set_random_state(3)(d)])
    c = torch.stack([s["image"] for s in t.set_random_state(4)(d)])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augmentation_keeps_shapes_and_zero_background(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    aug = {"flip_prob": 0.5, "intensity_prob": 1.0, "intensity_scale": 0.2, "intensity_shift": 0.3}
    plain = train_transforms(CFG, 8).set_random_state(0)(d)
    out = train_transforms(CFG, 8, augment=aug).set_random_state(0)(d)
    changed = 0
    for s, p in zip(out, plain, strict=True):
        assert type(s["image"]) is torch.Tensor and s["image"].shape == (4, 8, 8, 8)
        assert torch.all(s["image"][:, s["brain"][0] == 0] == 0)
        changed += not torch.equal(s["image"], p["image"])
    assert changed == len(out)
    with pytest.raises(ValueError, match="unknown augment keys"):
        train_transforms(CFG, 2, augment={"rotate": 1.0})


def test_sampler_falls_back_to_the_best_patch():
    brain = torch.zeros(1, 12, 12, 12, dtype=torch.uint8)
    brain[0, 2:4, 2:4, 2:4] = 1
    d = {
        "subject_id": "tiny",
        "image": torch.randn(4, 12, 12, 12) * brain,
        "seg": torch.zeros(1, 12, 12, 12, dtype=torch.int16),
        "brain": brain,
        "has_seg": False,
    }
    t = RandBrainPatchd(patch_size=8, num_samples=3, min_brain_fraction=0.5)
    t.set_random_state(0)
    for s in t(d):
        assert int(s["brain"].sum()) == 8  # the whole 2x2x2 brain is inside every patch


def test_sampling_index_matches_brute_force(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    out = AddSamplingIndexd()(d)
    assert set(out) == set(PREPROCESSED_KEYS) | set(SAMPLING_KEYS)
    brain = d["brain"][0] > 0
    shape = tuple(brain.shape)
    integral = out["brain_integral"]
    assert integral.dtype == torch.int32 and tuple(integral.shape) == tuple(s + 1 for s in shape)
    rng = np.random.default_rng(0)
    for _ in range(20):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, shape, strict=True)]
        box = brain[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].sum()
        corners = sum(
            (-1) ** (3 - sum(c)) * int(integral[tuple((hi if c[i] else lo)[i] for i in range(3))])
            for c in itertools.product((0, 1), repeat=3)
        )
        assert corners == int(box)
    flat = np.flatnonzero(brain.numpy())
    np.testing.assert_array_equal(out["brain_index"].numpy(), flat)
    tumour = np.flatnonzero(d["seg"][0].numpy() > 0)
    assert tumour.size > 0
    np.testing.assert_array_equal(out["tumour_index"].numpy(), tumour)
    no_seg = AddSamplingIndexd()({**d, "has_seg": False})
    assert no_seg["tumour_index"].numel() == 0


def test_cached_sampling_index_gives_the_same_patches(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    cached = AddSamplingIndexd()(d)
    t = train_transforms(CFG, 12, tumour_ratio=0.5, augment=DEFAULT_AUGMENT)
    ref = t.set_random_state(5)(d)
    fast = t.set_random_state(5)(cached)
    assert any(s["patch_tumour"] for s in ref)
    for a, b in zip(ref, fast, strict=True):
        assert set(a) == set(b) == set(PATCH_KEYS)
        assert torch.equal(a["patch_start"], b["patch_start"])
        assert a["patch_tumour"] == b["patch_tumour"]
        for key in ("image", "seg", "brain"):
            assert torch.equal(a[key], b[key]), key
    # Tables that do not fit the volume (e.g. from another subject) are rebuilt, not trusted.
    stale = {**cached, "brain_integral": cached["brain_integral"][:-1]}
    again = t.set_random_state(5)(stale)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ref, again, strict=True))


@pytest.mark.parametrize(
    ("shape", "patch", "stride", "fraction"),
    [
        ((40, 46, 37), 16, 12, 0.25),
        ((33, 40, 35), 8, 5, 0.3),
        ((32, 32, 32), 32, 32, 0.0),
        ((20, 21, 22), 8, 1, 0.9),
        ((24, 30, 26), 8, 8, 1.0),
    ],
)
def test_grid_counts_on_cpu_equal_the_integral_image_counts(shape, patch, stride, fraction):
    """The CPU grid counts brain voxels by window sums (one pass); CUDA keeps the integral
    image. Both must keep the same patches, on sparse, dense and empty masks."""
    from aad_med.data.patches import _box_counts, _grid_positions, _integral

    rng = np.random.default_rng(sum(shape) + patch)
    for density in (0.0, 0.02, 0.3, 0.97):
        brain = torch.from_numpy((rng.random(shape) < density).astype(np.uint8))[None]
        starts = _grid_positions(shape, patch, stride)
        counts = _box_counts(_integral(brain), starts, patch)
        keep = counts >= fraction * patch**3
        if not bool(keep.any()):
            keep = torch.zeros_like(keep)
            keep[counts.argmax()] = True
        assert torch.equal(eval_patch_positions(brain, patch, stride, fraction), starts[keep])
