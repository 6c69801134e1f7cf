"""Real scans shipped inside installed packages, read through the same loader as any cohort
(a CSV manifest pointing the four channels at one real file), validated and fingerprinted.

- nilearn's bundled MNI152 2009a T1 template (197x233x189, 1 mm, uint8)
- nibabel's test-data ``anatomical.nii`` (33x41x25, 2 mm, big-endian int16)
- Debian's insighttoolkit5-examples T1 (when that package is installed)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import write_csv_manifest

from aad_med import CHANNELS
from aad_med.data.fingerprint import cohort_fingerprint
from aad_med.data.io import load_subject
from aad_med.data.validation import load_cohort
from aad_med.errors import CohortError

ITK_EXAMPLE_DIRS = (
    Path("/usr/share/doc/insighttoolkit5-examples"),
    Path("/usr/share/insighttoolkit5/examples"),
)


def package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def mni_t1() -> Path:
    path = package_file("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if path is None:
        pytest.skip("nilearn (with its bundled MNI152 template) is not installed")
    return path


def nibabel_anatomical() -> Path:
    path = package_file("nibabel", "tests/data/anatomical.nii")
    if path is None:
        pytest.skip("this nibabel install ships no tests/data/anatomical.nii")
    return path


def manifest_for(tmp_path: Path, scan: Path, n: int = 1) -> Path:
    rows = [{"subject_id": f"real{i}", **{ch: str(scan) for ch in CHANNELS}} for i in range(n)]
    return write_csv_manifest(tmp_path / "manifest.csv", rows)


def expected_foreground(scan: Path) -> np.ndarray:
    data = np.asarray(nib.load(scan).dataobj, dtype=np.float64)
    return data[data != 0]


def test_mni152_through_loader_and_fingerprint(tmp_path):
    scan = mni_t1()
    cohort = load_cohort(manifest_for(tmp_path, scan))
    (subject,) = cohort.subjects
    loaded = load_subject(subject)
    assert loaded.image.shape == (4, 197, 233, 189)
    assert loaded.spacing == pytest.approx((1.0, 1.0, 1.0))
    fp = cohort_fingerprint(cohort)
    assert fp["layout"] == "csv" and fp["subject_ids"] == ["real0"]
    assert fp["shapes"] == [[197, 233, 189]] and fp["spacings"] == [[1.0, 1.0, 1.0]]
    assert fp["orientations"] == {"RAS": 1}
    fg = expected_foreground(scan)
    st = fp["intensity"]["t1"]
    assert st["n_voxels"] == fg.size
    assert st["mean"] == pytest.approx(fg.mean(), rel=1e-9)
    assert st["std"] == pytest.approx(fg.std(), rel=1e-6)
    # Percentiles come from a 10,000-voxel sample of ~2 million: close, not exact.
    assert st["p50"] == pytest.approx(np.percentile(fg, 50), rel=0.05)
    flair = fp["intensity"]["flair"]  # all four channels are the same file
    assert {k: flair[k] for k in ("n_voxels", "mean", "std", "min", "max")} == {
        k: st[k] for k in ("n_voxels", "mean", "std", "min", "max")
    }
    # A whole-head template: the head fills 1.5-2.5 litres.
    assert 1500 < fp["brain_volume_ml"]["mean"] < 2500
    json.dumps(fp, allow_nan=False)


def test_nibabel_anatomical_through_loader_and_fingerprint(tmp_path):
    scan = nibabel_anatomical()
    cohort = load_cohort(manifest_for(tmp_path, scan, n=2))
    assert cohort.subject_ids == ["real0", "real1"]
    loaded = load_subject(cohort.subjects[0])
    assert loaded.image.shape == (4, 33, 41, 25) and loaded.image.dtype == np.float32
    # Big-endian int16 on disk, scaled by the header: same values as nibabel's own reading.
    np.testing.assert_array_equal(loaded.image[2], np.asarray(nib.load(scan).dataobj, np.float32))
    fp = cohort_fingerprint(cohort)
    assert fp["spacings"] == [[2.0, 2.0, 2.0]] * 2
    fg = expected_foreground(scan)
    assert fp["intensity"]["t2"]["n_voxels"] == 2 * fg.size
    assert fp["intensity"]["t2"]["mean"] == pytest.approx(fg.mean(), rel=1e-9)


def test_real_scans_mixed_in_one_subject_are_refused(tmp_path):
    # Two real scans on different grids as modalities of one subject: a one-line error each.
    mni, anat = mni_t1(), nibabel_anatomical()
    row = {
        "subject_id": "mixed",
        "t1": str(mni),
        "t1ce": str(mni),
        "t2": str(anat),
        "flair": str(mni),
    }
    csv = write_csv_manifest(tmp_path / "m.csv", [row])
    with pytest.raises(CohortError) as ei:
        load_cohort(csv, check_voxels=False)
    (line,) = ei.value.problems
    assert line.startswith(f"{anat}: t2 shape (33, 41, 25) differs from t1 shape (197, 233, 189)")


def itk_kmeans_file(name: str) -> Path:
    for d in ITK_EXAMPLE_DIRS:
        hits = sorted(d.rglob(name)) if d.is_dir() else []
        if hits:
            return hits[0]
    pytest.skip(f"Debian's insighttoolkit5-examples is not installed (no {name})")


def test_itk_example_t1(tmp_path):
    """ITK's Kmeans example T1 (real, 128x128x62 at 2x2x3 mm, with skull) through the loader."""
    scan = itk_kmeans_file("KmeansTest_T1UCharRaw.nii.gz")
    cohort = load_cohort(manifest_for(tmp_path, scan))
    loaded = load_subject(cohort.subjects[0])
    assert loaded.image.shape == (4, 128, 128, 62)
    assert np.allclose(loaded.spacing, (2.0, 2.0, 3.0))
    fp = cohort_fingerprint(cohort)
    expected = expected_foreground(scan)
    assert fp["n_subjects"] == 1 and fp["intensity"]["t1"]["n_voxels"] == expected.size
    assert fp["intensity"]["t1"]["mean"] == pytest.approx(expected.mean(), rel=1e-6)


def test_itk_example_tissue_segmentation_is_not_a_tumour_seg(tmp_path):
    """The example's real k-means tissue map (labels 0-6) offered as a seg: one line naming it."""
    scan = itk_kmeans_file("KmeansTest_T1UCharRaw.nii.gz")
    seg = itk_kmeans_file("KmeansTest_T1KmeansPrelimSegmentation.nii.gz")
    rows = [{"subject_id": "itk0", **{ch: str(scan) for ch in CHANNELS}, "seg": str(seg)}]
    manifest = write_csv_manifest(tmp_path / "manifest.csv", rows)
    with pytest.raises(CohortError) as err:
        load_cohort(manifest)
    (line,) = err.value.problems
    assert line.startswith(f"{seg}:") and "label" in line
