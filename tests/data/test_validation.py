"""Cohort validation: every bad-input case of the loading side, each reported as one line
``file: problem``, all problems of a cohort at once, and the skip-with-warning option."""

from __future__ import annotations

import gzip
import os
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nifti_factory import (
    brain_like,
    truncate_file,
    tumour_like,
    write_absurd_header,
    write_brats_cohort,
    write_msd_cohort,
    write_nifti,
)

from aad_med.data import io
from aad_med.data.layouts import discover_cohort
from aad_med.data.validation import (
    SkippedSubjectsWarning,
    load_cohort,
    subject_problems,
    validate_cohort,
)
from aad_med.errors import CohortError

SHAPE = (24, 28, 20)


def cohort_dir(tmp_path: Path, n: int = 3) -> Path:
    return write_brats_cohort(tmp_path / "cohort", n=n)


def f(root: Path, i: int, ch: str) -> Path:
    sid = f"BraTS2021_{i:05d}"
    return root / sid / f"{sid}_{ch}.nii.gz"


def problems_of(root: Path, **kw) -> list[str]:
    with pytest.raises(CohortError) as ei:
        load_cohort(root, **kw)
    return ei.value.problems


def only_problem(root: Path, **kw) -> str:
    lines = problems_of(root, **kw)
    assert len(lines) == 1, lines
    return lines[0]


def test_valid_cohort_passes_unchanged(tmp_path):
    root = cohort_dir(tmp_path)
    cohort = discover_cohort(root)
    checked = validate_cohort(cohort)
    assert checked is not cohort
    assert checked.subjects == cohort.subjects and checked.skipped == []
    assert (checked.path, checked.layout) == (root, "brats2021")


def test_truncated_gz(tmp_path):
    root = cohort_dir(tmp_path)
    bad = truncate_file(f(root, 1, "t2"), 0.6)
    line = only_problem(root)
    assert line.startswith(f"{bad}: truncated or corrupt file")


def test_truncated_uncompressed_nii(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=2, layout="brats2020")
    bad = truncate_file(root / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii", 0.5)
    line = only_problem(root)
    assert line.startswith(f"{bad}: ")
    assert "truncated" in line


def test_truncated_inside_header(tmp_path):
    root = cohort_dir(tmp_path)
    bad = f(root, 0, "t1")
    raw = gzip.decompress(bad.read_bytes())[:200]
    bad.write_bytes(gzip.compress(raw))
    line = only_problem(root)
    assert line.startswith(f"{bad}: not a readable NIfTI file")


def test_not_nifti(tmp_path):
    root = cohort_dir(tmp_path)
    bad = f(root, 2, "flair")
    bad.write_text("<html>404 Not Found</html>")
    line = only_problem(root)
    assert line.startswith(f"{bad}: not a readable NIfTI file")


def test_other_image_format_with_nifti_name(tmp_path):
    root = cohort_dir(tmp_path)
    bad = f(root, 0, "t1ce")
    nib.save(nib.MGHImage(brain_like(), np.eye(4)), str(tmp_path / "x.mgz"))
    bad.write_bytes((tmp_path / "x.mgz").read_bytes())
    line = only_problem(root)
    assert line.startswith(f"{bad}: ")


def test_empty_file(tmp_path):
    root = cohort_dir(tmp_path)
    bad = f(root, 0, "t1")
    bad.write_bytes(b"")
    assert only_problem(root) == f"{bad}: file is empty"


@pytest.mark.parametrize(
    ("shape", "dims"), [((24, 28), "2D"), ((24, 28, 20, 2, 2), "5D"), ((24, 28, 20, 3), "4D")]
)
def test_wrong_dimensionality(tmp_path, shape, dims):
    root = cohort_dir(tmp_path)
    bad = write_nifti(f(root, 1, "t1"), np.ones(shape, np.float32))
    line = only_problem(root)
    assert line == f"{bad}: expected a 3D image, got {dims} with shape {shape}"


def test_trailing_singleton_dimension_is_fine(tmp_path):
    root = cohort_dir(tmp_path)
    write_nifti(f(root, 1, "t1"), brain_like()[..., None])
    assert len(load_cohort(root).subjects) == 3


def test_different_shapes(tmp_path):
    root = cohort_dir(tmp_path)
    bad = write_nifti(f(root, 2, "t2"), brain_like((24, 28, 21)))
    line = only_problem(root)
    assert line == (
        f"{bad}: t2 shape (24, 28, 21) differs from t1 shape (24, 28, 20) (BraTS2021_00002_t1.nii.gz)"
    )


def test_different_affines(tmp_path):
    root = cohort_dir(tmp_path)
    aff = np.eye(4)
    aff[0, 3] = 2.5
    bad = write_nifti(f(root, 0, "flair"), brain_like(), affine=aff)
    line = only_problem(root)
    assert line.startswith(
        f"{bad}: flair affine differs from t1 (BraTS2021_00000_t1.nii.gz) by 2.5"
    )


def test_affine_within_tolerance_is_fine(tmp_path):
    root = cohort_dir(tmp_path)
    aff = np.eye(4)
    aff[0, 3] = 1e-5
    write_nifti(f(root, 0, "flair"), brain_like(), affine=aff)
    assert len(load_cohort(root).subjects) == 3


@pytest.mark.parametrize(
    ("value", "text"), [(np.nan, "3 NaN and 0 Inf"), (np.inf, "0 NaN and 3 Inf")]
)
def test_nan_and_inf_voxels(tmp_path, value, text):
    root = cohort_dir(tmp_path)
    data = brain_like()
    data[1, 2, 3:6] = value
    bad = write_nifti(f(root, 1, "t1ce"), data)
    assert only_problem(root) == f"{bad}: {text} voxels"


def test_all_zero_volume(tmp_path):
    root = cohort_dir(tmp_path)
    bad = write_nifti(f(root, 0, "t2"), np.zeros(SHAPE, np.float32))
    assert only_problem(root) == f"{bad}: all voxels are zero (empty volume)"


def test_empty_seg_is_fine(tmp_path):
    root = cohort_dir(tmp_path)
    write_nifti(f(root, 0, "seg"), np.zeros(SHAPE), dtype=np.int16)
    assert load_cohort(root).n_with_seg == 3


def test_seg_with_unexpected_labels(tmp_path):
    root = cohort_dir(tmp_path)
    seg = tumour_like()
    seg[0, 0, :2] = [5, 255]
    bad = write_nifti(f(root, 2, "seg"), seg, dtype=np.int16)
    assert only_problem(root) == f"{bad}: segmentation labels {{5, 255}} outside {{0, 1, 2, 3, 4}}"


def test_seg_with_fractional_labels(tmp_path):
    root = cohort_dir(tmp_path)
    seg = tumour_like().astype(np.float32)
    seg[seg == 2] = 1.5
    bad = write_nifti(f(root, 2, "seg"), seg)
    assert only_problem(root) == f"{bad}: segmentation has non-integer labels"


def test_seg_on_another_grid(tmp_path):
    root = cohort_dir(tmp_path)
    bad = write_nifti(f(root, 1, "seg"), tumour_like((24, 28, 19)), dtype=np.int16)
    line = only_problem(root)
    assert line.startswith(f"{bad}: seg shape (24, 28, 19) differs from t1")


def test_absurd_header_refused_before_allocating(tmp_path):
    root = cohort_dir(tmp_path)
    bad = write_absurd_header(f(root, 1, "t1").with_suffix(""), dims=(32767, 32767, 32767))
    f(root, 1, "t1").unlink()
    assert bad.stat().st_size < 1000
    tracemalloc.start()
    t0 = time.perf_counter()
    line = only_problem(root)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert line.startswith(
        f"{bad}: header claims (32767, 32767, 32767) = 35,181,150,961,663 voxels"
    )
    assert line.endswith("refusing to allocate")
    # A naive load would ask for 140 TB; the whole validation stays within a few MB.
    assert peak < 50e6 and elapsed < 10


def test_absurd_nifti2_header(tmp_path):
    bad = write_absurd_header(tmp_path / "big.nii", dims=(100000, 100000, 100000), nifti2=True)
    with pytest.raises(io.InputError, match="1,000,000,000,000,000 voxels"):
        io.read_header(bad)


def test_lower_voxel_limit(tmp_path):
    root = cohort_dir(tmp_path, n=1)
    with pytest.raises(CohortError) as ei:
        validate_cohort(discover_cohort(root), max_voxels=1000)
    assert len(ei.value.problems) == 5  # four modalities and the seg
    assert all("more than the limit 1,000" in p for p in ei.value.problems)


def test_unreadable_file_via_access_check(tmp_path, monkeypatch):
    # Tests run as root, for whom chmod 000 changes nothing: make the permission check itself
    # say "denied" for this one file, as it would for an ordinary user.
    root = cohort_dir(tmp_path)
    bad = f(root, 1, "flair")
    bad.chmod(0)
    real_access = os.access

    def access(path, mode, *a, **k):
        if Path(path) == bad:
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(io.os, "access", access)
    assert only_problem(root) == f"{bad}: permission denied (file is not readable)"


def test_unreadable_file_when_open_fails(tmp_path, monkeypatch):
    # Root squash on NFS: os.access says yes but open() fails with EACCES.
    root = cohort_dir(tmp_path)
    bad = f(root, 0, "t2")
    real_load = nib.load

    def load(filename, *a, **k):
        if Path(filename) == bad:
            raise PermissionError(13, "Permission denied", str(filename))
        return real_load(filename, *a, **k)

    monkeypatch.setattr(io.nib, "load", load)
    assert only_problem(root) == f"{bad}: permission denied (file is not readable)"


# A real chmod-000 file refused by the kernel (tests run as root, so the child drops its
# permission override first): tests/cli/test_bad_inputs.py, unreadable_file cases.


def test_all_problems_reported_at_once(tmp_path):
    root = cohort_dir(tmp_path, n=4)
    data = brain_like()
    data[0, 0, 0] = np.nan
    nan_file = write_nifti(f(root, 0, "t1"), data)
    zero_file = write_nifti(f(root, 0, "flair"), np.zeros(SHAPE, np.float32))
    trunc = truncate_file(f(root, 2, "t1ce"), 0.5)
    shape_file = write_nifti(f(root, 3, "t2"), brain_like((20, 28, 20)))
    lines = problems_of(root)
    assert len(lines) == 4
    assert lines[0] == f"{nan_file}: 1 NaN and 0 Inf voxels"
    assert lines[1] == f"{zero_file}: all voxels are zero (empty volume)"
    assert lines[2].startswith(f"{trunc}: truncated or corrupt file")
    assert lines[3].startswith(f"{shape_file}: t2 shape (20, 28, 20) differs")


def test_skip_invalid_drops_bad_subjects_with_warning(tmp_path):
    root = cohort_dir(tmp_path, n=4)
    write_nifti(f(root, 1, "t2"), np.zeros(SHAPE, np.float32))
    (f(root, 3, "t1ce")).unlink()  # a discovery-level problem, also skippable
    with pytest.warns(SkippedSubjectsWarning, match=r"skipped 2 of 4 subjects"):
        cohort = load_cohort(root, skip_invalid=True)
    assert cohort.subject_ids == ["BraTS2021_00000", "BraTS2021_00002"]
    assert len(cohort.skipped) == 2
    assert cohort.skipped[0].endswith(
        "BraTS2021_00003: missing modality t1ce (no file named *_t1ce.nii[.gz])"
    )
    assert cohort.skipped[1] == f"{f(root, 1, 't2')}: all voxels are zero (empty volume)"


def test_skip_invalid_with_all_subjects_bad_still_fails(tmp_path):
    root = cohort_dir(tmp_path, n=2)
    for i in range(2):
        write_nifti(f(root, i, "t1"), np.zeros(SHAPE, np.float32))
    lines = problems_of(root, skip_invalid=True)
    assert len(lines) == 3
    assert lines[-1] == f"{root}: no valid subject left after skipping"


def test_headers_only_does_not_read_voxels(tmp_path, monkeypatch):
    root = cohort_dir(tmp_path)
    write_nifti(f(root, 0, "t1"), np.zeros(SHAPE, np.float32))

    def no_voxels(*a, **k):
        raise AssertionError("voxels read with check_voxels=False")

    monkeypatch.setattr("aad_med.data.validation.read_stored", no_voxels)
    assert len(load_cohort(root, check_voxels=False).subjects) == 3


def test_header_problem_does_not_hide_other_files(tmp_path):
    root = cohort_dir(tmp_path, n=1)
    f(root, 0, "t1").write_text("garbage")
    data = brain_like()
    data[5, 5, 5] = np.inf
    write_nifti(f(root, 0, "flair"), data)
    lines = subject_problems(discover_cohort(root).subjects[0])
    assert [Path(x.split(": ")[0]).name for x in lines] == [
        "BraTS2021_00000_t1.nii.gz",
        "BraTS2021_00000_flair.nii.gz",
    ]


def test_msd_4d_volume_problem_names_volume_and_channel(tmp_path):
    write_msd_cohort(tmp_path, n=2)
    img = tmp_path / "imagesTr" / "BRATS_002.nii.gz"
    data = np.asarray(nib.load(img).dataobj).copy()
    data[..., 2] = 0  # volume 2 is T1gd in Task01
    write_nifti(img, data)
    assert only_problem(tmp_path) == f"{img} (volume 2, t1ce): all voxels are zero (empty volume)"


def test_msd_with_too_few_volumes_reported_once(tmp_path):
    write_msd_cohort(tmp_path, n=1)
    img = tmp_path / "imagesTr" / "BRATS_001.nii.gz"
    write_nifti(img, np.stack([brain_like()] * 3, -1))
    assert only_problem(tmp_path) == f"{img}: has 3 volumes, volume 3 requested"


def test_msd_3d_image_instead_of_4d(tmp_path):
    write_msd_cohort(tmp_path, n=1)
    img = write_nifti(tmp_path / "imagesTr" / "BRATS_001.nii.gz", brain_like())
    assert only_problem(tmp_path) == f"{img}: expected a 4D image, got 3D with shape {SHAPE}"


def test_load_cohort_reports_discovery_problems(tmp_path):
    root = cohort_dir(tmp_path)
    f(root, 2, "flair").unlink()
    assert only_problem(root).endswith(
        "BraTS2021_00002: missing modality flair (no file named *_flair.nii[.gz])"
    )


def test_voxel_markers_skip_decoding_and_take_digests_from_the_memo(tmp_path, monkeypatch):
    """A subject whose voxels passed is not decoded again; the markers' keys hash each file
    once, then the digest memo answers (a new process hashes nothing)."""
    import aad_med.io_utils as io_utils

    cohort = discover_cohort(cohort_dir(tmp_path, n=2))
    checked, digests = tmp_path / "cache" / "checked", tmp_path / "cache" / "digests"
    hashed: list = []
    real_sha = io_utils.file_sha256
    monkeypatch.setattr(io_utils, "_DIGESTS", {})
    monkeypatch.setattr(io_utils, "file_sha256", lambda p, *a: hashed.append(p) or real_sha(p))
    decoded: list = []
    real_read = io.read_stored
    monkeypatch.setattr(
        "aad_med.data.validation.read_stored", lambda *a: decoded.append(a[1]) or real_read(*a)
    )
    kw = dict(checked_dir=checked, digests_dir=digests)
    validate_cohort(cohort, check_voxels=False, **kw)
    assert len(hashed) == 2 * 5 and decoded == []
    assert sorted(p.name[:10] for p in checked.iterdir()) == ["headers-ok"] * 2
    assert len(list(digests.glob("*.json"))) == 2
    hashed.clear()
    monkeypatch.setattr(io_utils, "_DIGESTS", {})  # a new process
    validate_cohort(cohort, **kw)
    assert hashed == [] and len(decoded) == 2 * 5  # voxels were never checked: decoded now
    decoded.clear()
    monkeypatch.setattr(io_utils, "_DIGESTS", {})  # a new process
    assert validate_cohort(cohort, **kw).subjects == cohort.subjects
    assert hashed == [] and decoded == []
    # An edited file (same size, restored mtime) is hashed and decoded again.
    path = cohort.subjects[0].images["t1"].path
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CohortError):  # flipped gzip bytes: the decode finds the damage
        validate_cohort(cohort, **kw)
    assert path in hashed and path in decoded


def test_header_markers_skip_header_reads_until_a_file_or_a_limit_changes(tmp_path, monkeypatch):
    cohort = discover_cohort(cohort_dir(tmp_path, n=2))
    kw = dict(check_voxels=False, checked_dir=tmp_path / "checked")
    validate_cohort(cohort, **kw)
    reads: list = []
    real = io.read_header
    monkeypatch.setattr(
        "aad_med.data.validation.read_header", lambda *a: reads.append(a[0]) or real(*a)
    )
    assert validate_cohort(cohort, **kw).subjects == cohort.subjects
    assert reads == []
    # Another limit is another key: the headers are read again.
    validate_cohort(cohort, max_voxels=10**8, **kw)
    assert len(reads) == 2 * 5
    reads.clear()
    # A header marker does not stand for voxel checks.
    decoded: list = []
    real_read = io.read_stored
    monkeypatch.setattr(
        "aad_med.data.validation.read_stored", lambda *a: decoded.append(a[1]) or real_read(*a)
    )
    validate_cohort(cohort, checked_dir=tmp_path / "checked")
    assert len(decoded) == 2 * 5
    # A file rewritten with a problem (same name) is found: its content is another key.
    reads.clear()
    bad = cohort.subjects[1].images["flair"].path
    write_nifti(bad, np.full(SHAPE, np.nan, np.float32))
    with pytest.raises(CohortError, match="NaN"):
        validate_cohort(cohort, checked_dir=tmp_path / "checked")
    assert bad in reads
