"""Tests of the MONAI preprocessing stage: shapes and dtypes of every step, normalisation, RAS
orientation, resampling, brain crop, padding, training patch sampling and the evaluation grid."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from nifti_factory import TINY_SHAPE, brain_like, tumour_like, write_nifti

from aad_med import CHANNELS
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import ImageSource, SubjectRecord
from aad_med.data.transforms import (
    DEFAULT_AUGMENT,
    PATCH_KEYS,
    PREPROCESSED_KEYS,
    SAMPLING_KEYS,
    AddSamplingIndexd,
    LoadSubjectd,
    RandBrainPatchd,
    deterministic_transforms,
    eval_patch_grid,
    eval_patch_positions,
    extract_patches,
    train_transforms,
)
from aad_med.errors import InputError


def write_subject(
    root: Path,
    sid: str,
    affine=None,
    with_seg: bool = True,
    seed: int = 0,
    shape=TINY_SHAPE,
    flip_axes: tuple[int, ...] = (),
) -> SubjectRecord:
    """Write one subject in the BraTS 2021 layout; ``flip_axes`` flips the stored voxel order."""
    folder = Path(root) / sid
    images = {}
    for i, ch in enumerate(CHANNELS):
        data = brain_like(shape, seed * 10 + i, scale=1 + i)
        if flip_axes:
            data = np.flip(data, flip_axes).copy()
        images[ch] = ImageSource(write_nifti(folder / f"{sid}_{ch}.nii.gz", data, affine))
    seg = None
    if with_seg:
        s = tumour_like(shape)
        if flip_axes:
            s = np.flip(s, flip_axes).copy()
        seg = ImageSource(write_nifti(folder / f"{sid}_seg.nii.gz", s, affine, dtype=np.int16))
    return SubjectRecord(sid, images, seg)


def raw_image(record: SubjectRecord) -> np.ndarray:
    return np.stack([np.asarray(nib.load(str(record.images[ch].path)).dataobj) for ch in CHANNELS])


@pytest.fixture
def subject(tmp_path) -> SubjectRecord:
    return write_subject(tmp_path, "S0")


CFG = PreprocessingConfig(patch_size=8, min_brain_fraction=0.5)


def test_load_subjectd_outputs_metatensors(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [5, -3, 2]
    rec = write_subject(tmp_path, "S0", affine=affine)
    d = LoadSubjectd()(rec.as_dict())
    assert set(d) == {"subject_id", "image", "seg", "has_seg"}
    assert d["subject_id"] == "S0" and d["has_seg"] is True
    assert isinstance(d["image"], MetaTensor) and d["image"].dtype == torch.float32
    assert tuple(d["image"].shape) == (4, *TINY_SHAPE)
    assert np.allclose(d["image"].affine.numpy(), affine)
    np.testing.assert_array_equal(d["image"].numpy(), raw_image(rec))
    assert tuple(d["seg"].shape) == (1, *TINY_SHAPE)
    np.testing.assert_array_equal(d["seg"].numpy()[0], tumour_like())

    no_seg = write_subject(tmp_path, "S1", with_seg=False)
    d = LoadSubjectd()(no_seg.as_dict())
    assert d["has_seg"] is False
    assert tuple(d["seg"].shape) == (1, *TINY_SHAPE) and not d["seg"].any()


def test_missing_file_stays_input_error(subject):
    subject.images["t2"].path.unlink()
    with pytest.raises(InputError, match=r"S0_t2\.nii\.gz: file does not exist"):
        deterministic_transforms(CFG)(subject.as_dict())


def test_deterministic_keys_shapes_dtypes_and_crop(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    assert set(d) == set(PREPROCESSED_KEYS)
    raw = raw_image(subject)
    union = (raw != 0).any(0)
    nz = np.nonzero(union)
    lo = [int(a.min()) for a in nz]
    hi = [int(a.max()) + 1 for a in nz]
    box = tuple(h - lo_ for lo_, h in zip(lo, hi, strict=True))
    assert d["crop_start"] == lo
    assert d["ras_shape"] == list(TINY_SHAPE)
    assert d["spacing"] == [1.0, 1.0, 1.0]
    assert tuple(d["image"].shape) == (4, *box) and d["image"].dtype == torch.float32
    assert tuple(d["seg"].shape) == (1, *box) and d["seg"].dtype == torch.int16
    assert tuple(d["brain"].shape) == (1, *box) and d["brain"].dtype == torch.uint8
    assert d["affine"].dtype == torch.float64 and tuple(d["affine"].shape) == (4, 4)
    # The affine maps preprocessed voxel 0 to the world position of the crop start.
    np.testing.assert_allclose(d["affine"][:3, 3].numpy(), lo)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    np.testing.assert_array_equal(d["brain"][0].numpy(), union[sl].astype(np.uint8))
    np.testing.assert_array_equal(d["seg"][0].numpy(), tumour_like()[sl])
    assert d["has_seg"] is True and d["subject_id"] == "S0"


def test_zscore_per_channel_over_nonzero_voxels(subject):
    d = deterministic_transforms(CFG)(subject.as_dict())
    img = d["image"].double()
    raw = raw_image(subject)
    assert torch.all(img[:, d["brain"][0] == 0] == 0)
    for c in range(4):
        fg = img[c][img[c] != 0]
        assert abs(float(fg.mean())) < 1e-5
        assert abs(float(fg.std(unbiased=False)) - 1.0) < 1e-4
        # Same number of non-zero voxels as the raw channel: the background was not shifted.
        assert fg.numel() == int(np.count_nonzero(raw[c]))


def test_ras_orientation_equals_flipped_back(tmp_path):
    x, y, _ = TINY_SHAPE
    ras = write_subject(tmp_path, "RAS")
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [x - 1, y - 1, 0]  # same world positions as the RAS file
    lps = write_subject(tmp_path, "LPS", affine=lps_affine, flip_axes=(0, 1))
    # The stored voxel order really differs.
    assert not np.array_equal(raw_image(ras), raw_image(lps))
    a = deterministic_transforms(CFG)(ras.as_dict())
    b = deterministic_transforms(CFG)(lps.as_dict())
    for key in ("image", "seg", "brain"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert a["crop_start"] == b["crop_start"] and a["ras_shape"] == b["ras_shape"]
    torch.testing.assert_close(a["affine"], b["affine"])


def test_resampling_to_2mm_halves_the_shape(subject):
    cfg = PreprocessingConfig(patch_size=4, spacing=(2.0, 2.0, 2.0), crop_foreground=False)
    d = deterministic_transforms(cfg)(subject.as_dict())
    half = tuple(s // 2 for s in TINY_SHAPE)
    assert d["ras_shape"] == list(half)
    assert tuple(d["image"].shape) == (4, *half)
    assert tuple(d["seg"].shape) == (1, *half) and tuple(d["brain"].shape) == (1, *half)
    assert d["spacing"] == [2.0, 2.0, 2.0]
    np.testing.assert_allclose(np.diag(d["affine"].numpy())[:3], [2.0, 2.0, 2.0])
    # Nearest-neighbour keeps labels; the image stays 0 outside the resampled brain.
    assert set(torch.unique(d["seg"]).tolist()) <= {0, 1, 2, 4}
    assert torch.all(d["image"][:, d["brain"][0] == 0] == 0)


def test_no_crop_keeps_volume_and_skips_resampling(subject):
    cfg = PreprocessingConfig(patch_size=8, crop_foreground=False)
    d = deterministic_transforms(cfg)(subject.as_dict())
    assert d["crop_start"] == [0, 0, 0] and tuple(d["image"].shape[1:]) == TINY_SHAPE
    # Already at 1 mm: no interpolation, so the brain mask is exactly the raw union.
    np.testing.assert_array_equal(d["brain"][0].numpy(), (raw_image(subject) != 0).any(0))


def test_pads_at_the_end_up_to_patch_size(subject):
    small = deterministic_transforms(CFG)(subject.as_dict())
    big = deterministic_transforms(PreprocessingConfig(patch_size=24))(subject.as_dict())
    box = tuple(small["image"].shape[1:])
    assert tuple(big["image"].shape[1:]) == tuple(max(s, 24) for s in box)
    sl = (slice(None),) + tuple(slice(0, s) for s in box)
    torch.testing.assert_close(big["image"][sl], small["image"])
    assert big["crop_start"] == small["crop_start"]
    assert not big["brain"].sum() - small["brain"].sum()


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


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("patch", [8, 40])
def test_fused_preprocessing_equals_the_monai_chain(tmp_path, crop, patch):
    """The one-pass path (subject already RAS at the target spacing) gives the MONAI chain's
    result: every key, the z-scores to float32 rounding, padding and crop included."""
    from aad_med.data.transforms import FusedPreprocessd, _fused, monai_transforms

    cfg = PreprocessingConfig(patch_size=patch, crop_foreground=crop)
    rec = write_subject(tmp_path, "RAS")
    loaded = LoadSubjectd(target_spacing=cfg.spacing, patch_size=patch)(rec.as_dict())
    assert _fused(dict(loaded), cfg) is not None  # the fast path is really taken
    a = deterministic_transforms(cfg)(rec.as_dict())
    b = monai_transforms(cfg)(rec.as_dict())
    assert set(a) == set(b) == set(PREPROCESSED_KEYS)
    for key in ("image", "seg", "brain", "affine"):
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=2e-6)
    assert torch.equal(a["seg"], b["seg"]) and torch.equal(a["brain"], b["brain"])
    assert torch.equal(a["affine"], b["affine"])
    assert (a["image"][b["image"] == 0] == 0).all()  # background exactly 0, no -0.0 drift
    for key in ("crop_start", "ras_shape", "spacing", "has_seg", "subject_id"):
        assert a[key] == b[key], key
    assert isinstance(deterministic_transforms(cfg).transforms[1], FusedPreprocessd)


def test_fused_preprocessing_falls_back_when_reorientation_or_resampling_is_needed(tmp_path):
    from aad_med.data.transforms import _fused

    x, y, _ = TINY_SHAPE
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [x - 1, y - 1, 0]
    lps = write_subject(tmp_path, "LPS", affine=lps_affine, flip_axes=(0, 1))
    loaded = LoadSubjectd()(lps.as_dict())
    assert _fused(dict(loaded), CFG) is None
    coarse = PreprocessingConfig(patch_size=8, spacing=(2.0, 2.0, 2.0))
    ras = write_subject(tmp_path, "RAS")
    assert _fused(dict(LoadSubjectd()(ras.as_dict())), coarse) is None
