"""Cohort fingerprint: keys other tools script against, exact statistics, streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nifti_factory import (
    brain_like,
    tumour_like,
    write_brats_cohort,
    write_csv_manifest,
    write_msd_cohort,
    write_nifti,
)

from aad_med import CHANNELS
from aad_med.data import fingerprint as fpmod
from aad_med.data.fingerprint import PERCENTILES, cohort_fingerprint
from aad_med.data.validation import load_cohort

REQUIRED = {
    "path",
    "layout",
    "n_subjects",
    "subject_ids",
    "channels",
    "n_with_seg",
    "shapes",
    "spacings",
    "intensity",
    "n_skipped",
    "skipped",
}


def test_keys_and_values_match_the_files(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=3)
    fp = cohort_fingerprint(load_cohort(root))
    assert set(fp) >= REQUIRED
    assert fp["path"] == str(root) and fp["layout"] == "brats2021"
    assert fp["n_subjects"] == 3
    assert fp["subject_ids"] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert fp["channels"] == list(CHANNELS) and fp["n_with_seg"] == 3
    assert fp["shapes"] == [[24, 28, 20]] * 3 and fp["spacings"] == [[1.0, 1.0, 1.0]] * 3
    assert fp["orientations"] == {"RAS": 3}
    assert fp["n_skipped"] == 0 and fp["skipped"] == []
    # The factory writes channel c of subject i as brain_like(seed=10 * i + c).
    for c, ch in enumerate(CHANNELS):
        fg = np.concatenate([brain_like(seed=10 * i + c) for i in range(3)])
        fg = fg[fg != 0].astype(np.float64)
        st = fp["intensity"][ch]
        assert st["n_voxels"] == fg.size
        assert st["mean"] == pytest.approx(fg.mean(), rel=1e-9)
        assert st["std"] == pytest.approx(fg.std(), rel=1e-6)
        assert (st["min"], st["max"]) == pytest.approx((fg.min(), fg.max()))
        for key, q in PERCENTILES.items():
            # Small cohort: every foreground voxel is in the sample, so percentiles are exact.
            assert st[key] == pytest.approx(np.percentile(fg, q), rel=1e-5)
    brain = (brain_like() != 0).sum() / 1000.0
    assert fp["brain_volume_ml"]["mean"] == pytest.approx(brain)
    seg = tumour_like()
    assert fp["seg"]["n_with_tumour"] == 3
    assert fp["seg"]["label_voxels"] == {str(k): 3 * int((seg == k).sum()) for k in (0, 1, 2, 4)}
    json.dumps(fp, allow_nan=False)  # strictly JSON-serialisable


def test_spacing_and_shape_from_headers(tmp_path):
    root = write_msd_cohort(tmp_path, n=2, shape=(20, 22, 18))
    cohort = load_cohort(root)
    fp = cohort_fingerprint(cohort)
    assert fp["layout"] == "msd" and fp["shapes"] == [[20, 22, 18]] * 2
    img = tmp_path / "aniso.nii.gz"
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    write_nifti(img, brain_like((20, 22, 18)), affine=aff)
    csv = write_csv_manifest(
        tmp_path / "m.csv", [{"subject_id": "a", **{ch: img.name for ch in CHANNELS}}]
    )
    fp2 = cohort_fingerprint(load_cohort(csv))
    assert fp2["spacings"] == [[0.8, 0.8, 3.0]] and fp2["median_spacing"] == [0.8, 0.8, 3.0]
    assert fp2["n_with_seg"] == 0 and fp2["seg"]["n_read"] == 0


def test_intensity_moves_with_scale(tmp_path):
    a = cohort_fingerprint(load_cohort(write_brats_cohort(tmp_path / "a", n=2)))
    b = cohort_fingerprint(load_cohort(write_brats_cohort(tmp_path / "b", n=2, scale=3.0)))
    for ch in CHANNELS:
        assert b["intensity"][ch]["mean"] == pytest.approx(3 * a["intensity"][ch]["mean"], rel=1e-5)
        assert b["intensity"][ch]["p50"] == pytest.approx(3 * a["intensity"][ch]["p50"], rel=1e-5)


def test_max_subjects_reads_spread_subset(tmp_path, monkeypatch):
    root = write_brats_cohort(tmp_path / "c", n=5)
    cohort = load_cohort(root)
    read = []
    real = fpmod.load_subject
    monkeypatch.setattr(
        fpmod, "load_subject", lambda rec, **k: read.append(rec.subject_id) or real(rec, **k)
    )
    fp = cohort_fingerprint(cohort, max_subjects=3)
    assert read == ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00004"]
    assert fp["n_fingerprinted"] == 3 and fp["fingerprinted_ids"] == read
    assert fp["n_subjects"] == 5 and len(fp["shapes"]) == 5


def test_zero_subjects_read_gives_null_intensity(tmp_path):
    fp = cohort_fingerprint(load_cohort(write_brats_cohort(tmp_path / "c", n=2)), max_subjects=0)
    assert fp["intensity"]["t1"]["mean"] is None and fp["intensity"]["t1"]["p50"] is None
    json.dumps(fp, allow_nan=False)


def test_percentile_sample_is_seeded(tmp_path, monkeypatch):
    monkeypatch.setattr(fpmod, "SAMPLES_PER_SUBJECT", 500)
    cohort = load_cohort(write_brats_cohort(tmp_path / "c", n=2))
    a, b = cohort_fingerprint(cohort), cohort_fingerprint(cohort)
    assert a == b
    c = cohort_fingerprint(cohort, seed=1)
    assert c["intensity"]["t1"]["mean"] == a["intensity"]["t1"]["mean"]  # exact moments
    assert c["intensity"]["t1"]["p25"] != a["intensity"]["t1"]["p25"]  # sampled percentile


def test_skipped_subjects_are_listed(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=3)
    write_nifti(
        root / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz", np.zeros((24, 28, 20), np.float32)
    )
    with pytest.warns(UserWarning):
        cohort = load_cohort(root, skip_invalid=True)
    fp = cohort_fingerprint(cohort)
    assert fp["n_subjects"] == 2 and fp["n_skipped"] == 1
    assert "BraTS2021_00001_t2.nii.gz: all voxels are zero" in fp["skipped"][0]
