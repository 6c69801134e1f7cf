"""Tests of the MONAI preprocessing stage: shapes and dtypes of every step, normalisation, RAS
orientation, resampling, brain crop, padding, training patch sampling and the evaluation grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from nifti_factory import TINY_SHAPE, tumour_like, write_subject

from aad_med import CHANNELS
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.data.transforms import PREPROCESSED_KEYS, LoadSubjectd, deterministic_transforms
from aad_med.errors import InputError


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


def write_int16_subject(root, sid: str, affine=None, flip_axes=()) -> SubjectRecord:
    """A subject stored as int16 (as BraTS is), the float32 test subject rounded."""
    rec = write_subject(root, sid, affine=affine, flip_axes=flip_axes)
    for ch in CHANNELS:
        img = nib.load(str(rec.images[ch].path))
        data = np.round(np.asarray(img.dataobj)).astype(np.int16)
        nib.save(nib.Nifti1Image(data, img.affine), str(rec.images[ch].path))
    return rec


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("patch", [8, 40])
def test_fused_preprocessing_of_the_stored_int16_image_equals_that_of_its_float32_cast(
    tmp_path, crop, patch
):
    """LoadSubjectd's native image (int16, stored layout) preprocesses bit for bit like the
    C-ordered float32 image, and like the MONAI chain to float32 rounding."""
    from aad_med.data.transforms import _fused, monai_transforms

    cfg = PreprocessingConfig(patch_size=patch, crop_foreground=crop)
    rec = write_int16_subject(tmp_path, "RAS")
    native = LoadSubjectd()(rec.as_dict())
    plain = LoadSubjectd(native=False)(rec.as_dict())
    assert native["image"].dtype == torch.int16 and not native["image"].is_contiguous()
    assert plain["image"].dtype == torch.float32 and plain["image"].is_contiguous()
    a, b = _fused(dict(native), cfg), _fused(dict(plain), cfg)
    for key in ("image", "seg", "brain", "affine"):
        assert a[key].dtype == b[key].dtype and a[key].is_contiguous(), key
        assert torch.equal(a[key], b[key]), key
    assert a["crop_start"] == b["crop_start"] and a["ras_shape"] == b["ras_shape"]
    ref = monai_transforms(cfg)(rec.as_dict())
    torch.testing.assert_close(a["image"], ref["image"], rtol=0, atol=2e-6)
    assert torch.equal(a["brain"], ref["brain"]) and torch.equal(a["seg"], ref["seg"])


def test_a_native_image_that_needs_reorienting_goes_through_the_monai_chain_unchanged(tmp_path):
    """The fallback (an LPS subject) gets the C-ordered float32 image the MONAI chain expects."""
    from aad_med.data.transforms import monai_transforms

    x, y, _ = TINY_SHAPE
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [x - 1, y - 1, 0]
    rec = write_int16_subject(tmp_path, "LPS", affine=lps_affine, flip_axes=(0, 1))
    a = deterministic_transforms(CFG)(rec.as_dict())
    b = monai_transforms(CFG)(rec.as_dict())
    for key in ("image", "seg", "brain", "affine"):
        assert torch.equal(a[key], b[key]), key
    assert a["crop_start"] == b["crop_start"]


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64])
def test_the_brain_mask_is_where_any_channel_is_non_zero_in_any_layout(dtype):
    """The channels' bits OR-ed once equal a comparison per channel; -0.0 is background."""
    from aad_med.data.transforms import _any_channel_nonzero

    rng = np.random.default_rng(0)
    a = (rng.integers(-2, 3, (4, 5, 6, 7)) * (rng.random((4, 5, 6, 7)) < 0.3)).astype(dtype)
    if a.dtype.kind == "f":
        a[a == 0] = -0.0
    expected = (a != 0).any(axis=0)
    stored = np.empty((4, 7, 6, 5), dtype).transpose(0, 3, 2, 1)  # x fastest, as NIfTI
    stored[...] = a
    for volume in (a, stored):
        got = _any_channel_nonzero(volume)
        assert got.dtype == bool and np.array_equal(got, expected)
