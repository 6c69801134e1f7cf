"""Links that loop or dangle, and device files, inside a cohort are reported as what they are
(one line naming the file), never as a missing modality or a file that "does not exist"."""

from __future__ import annotations

import os

import pytest

from aad_med.data.io import file_problem, read_header
from aad_med.data.layouts import discover_cohort
from aad_med.data.validation import load_cohort
from aad_med.errors import CohortError, InputError
from tests.nifti_factory import write_brats_cohort, write_csv_cohort


def _t2(cohort):
    return next(cohort.rglob("*_00001_t2.nii.gz"))


def test_looping_symlink_in_a_subject_folder_is_named(tmp_path):
    cohort = write_brats_cohort(tmp_path / "c", n=3)
    t2 = _t2(cohort)
    t2.unlink()
    other = t2.with_name("loop.nii.gz")
    t2.symlink_to(other)
    other.symlink_to(t2)
    with pytest.raises(CohortError) as e:
        load_cohort(cohort)
    msg = str(e.value)
    assert f"{t2}: symbolic link loop" in msg
    assert "no file named *_t2" not in msg and "missing modality t2" not in msg


def test_broken_symlink_is_named(tmp_path):
    cohort = write_brats_cohort(tmp_path / "c", n=3)
    t2 = _t2(cohort)
    t2.unlink()
    t2.symlink_to(tmp_path / "moved_away.nii.gz")
    with pytest.raises(CohortError, match=r"_t2\.nii\.gz: broken symbolic link \(points to "):
        discover_cohort(cohort)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_symlink_is_named_and_never_read(tmp_path):
    cohort = write_brats_cohort(tmp_path / "c", n=3)
    t2 = _t2(cohort)
    t2.unlink()
    t2.symlink_to("/dev/zero")
    with pytest.raises(CohortError) as e:
        load_cohort(cohort)
    assert f"{t2}: not a regular file (a device, FIFO or socket)" in str(e.value)
    assert "missing modality" not in str(e.value)
    with pytest.raises(InputError, match="not a regular file"):
        read_header(t2)


def test_fifo_in_a_manifest_is_named_not_read(tmp_path):
    manifest = write_csv_cohort(tmp_path / "m", n=2)
    fifo = tmp_path / "m" / "pipe_t2.nii.gz"
    os.mkfifo(fifo)
    text = manifest.read_text().splitlines()
    cells = text[1].split(",")
    cells[3] = str(fifo)
    text[1] = ",".join(cells)
    manifest.write_text("\n".join(text) + "\n")
    with pytest.raises(CohortError, match=r"t2 file .*pipe_t2\.nii\.gz not a regular file"):
        discover_cohort(manifest)


def test_file_problem_words(tmp_path):
    f = tmp_path / "a.nii"
    f.write_bytes(b"x")
    assert file_problem(f) is None
    assert file_problem(tmp_path) == "is a folder, expected a NIfTI file"
    assert file_problem(tmp_path / "none.nii") == "file does not exist"
