"""aad-inspect as users call it: a subprocess per command line, exit codes, one-line errors
naming the file, no traceback, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nifti_factory import (
    brain_like,
    truncate_file,
    tumour_like,
    write_absurd_header,
    write_brats_cohort,
    write_brats_subject,
    write_csv_cohort,
    write_csv_manifest,
    write_msd_cohort,
    write_nifti,
)

from aad_med import CHANNELS
from aad_med.cli import inspect as cli
from aad_med.data import io

SHAPE = (24, 28, 20)


def run(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "AAD_MED_VERBOSE": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "aad_med.cli.inspect", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )


def assert_one_line_error(res: subprocess.CompletedProcess, path: Path, problem: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"aad-inspect: error: {path}: "), lines[0]
    assert problem in lines[0]


def sid_file(root: Path, i: int, ch: str) -> Path:
    sid = f"BraTS2021_{i:05d}"
    return root / sid / f"{sid}_{ch}.nii.gz"


def test_each_layout_and_json(tmp_path):
    b21 = write_brats_cohort(tmp_path / "b21", n=2)
    b20 = write_brats_cohort(tmp_path / "b20", n=2, layout="brats2020", with_seg=False)
    b23 = write_brats_cohort(tmp_path / "b23", n=3, layout="brats2023")
    msd = write_msd_cohort(tmp_path / "msd", n=2)
    csv = write_csv_cohort(tmp_path / "site", n=2)
    out = tmp_path / "out" / "fingerprint.json"
    res = run(b21, b20, b23, msd, csv, "--json", out)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    doc = json.loads(out.read_text())
    cohorts = doc["cohorts"]
    assert [c["layout"] for c in cohorts] == ["brats2021", "brats2020", "brats2023", "msd", "csv"]
    assert [c["n_subjects"] for c in cohorts] == [2, 2, 3, 2, 2]
    assert [c["n_with_seg"] for c in cohorts] == [2, 0, 3, 2, 2]
    assert cohorts[2]["subject_ids"] == [f"BraTS-GLI-{i:05d}-000" for i in range(3)]
    assert cohorts[4]["path"] == str(csv)
    assert all(c["channels"] == list(CHANNELS) for c in cohorts)
    # MSD channels land in canonical order: the factory scales channel c by (c + 1).
    means = [cohorts[3]["intensity"][ch]["mean"] for ch in CHANNELS]
    assert means == pytest.approx([100, 200, 300, 400], rel=0.05)
    assert "cohort " + str(b23) + "  (layout brats2023)" in res.stdout
    assert "subjects  3 (3 with seg, 0 skipped)" in res.stdout
    assert f"fingerprint written to {out}" in res.stdout
    assert [p.name for p in out.parent.iterdir()] == ["fingerprint.json"]


def test_no_json_prints_table_only(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=2)
    res = run(root)
    assert res.returncode == 0
    assert "t1ce" in res.stdout and "shape     24x28x20 (all)" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_truncated_file(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=2)
    bad = truncate_file(sid_file(root, 1, "t1"), 0.5)
    out = tmp_path / "out" / "fp.json"
    res = run(root, "--json", out)
    assert_one_line_error(res, bad, "truncated or corrupt file")
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_not_nifti(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=2)
    bad = sid_file(root, 0, "flair")
    bad.write_bytes(b"PK\x03\x04 a zip file, not a NIfTI")
    assert_one_line_error(run(root), bad, "not a readable NIfTI file")


def test_absurd_header(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=1)
    bad = sid_file(root, 0, "t2")
    write_absurd_header(bad.with_suffix(""))
    bad.unlink()
    assert_one_line_error(run(root), bad.with_suffix(""), "refusing to allocate")


def test_seg_with_unexpected_labels(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=2)
    seg = tumour_like()
    seg[1, 1, 1] = 6
    bad = write_nifti(sid_file(root, 1, "seg"), seg, dtype=np.int16)
    assert_one_line_error(run(root), bad, "segmentation labels {6} outside {0, 1, 2, 3, 4}")


def test_missing_modality(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=2)
    sid_file(root, 1, "t1ce").unlink()
    assert_one_line_error(run(root), root / "BraTS2021_00001", "missing modality t1ce")


def test_mixed_layouts(tmp_path):
    write_brats_subject(tmp_path / "c", "BraTS2021_00001")
    write_brats_subject(tmp_path / "c", "BraTS-GLI-00002-000", layout="brats2023")
    assert_one_line_error(run(tmp_path / "c"), tmp_path / "c", "cohort mixes layouts")


def test_csv_missing_column(tmp_path):
    csv = write_csv_manifest(tmp_path / "m.csv", [], columns=("subject_id", "t1", "t2"))
    assert_one_line_error(run(csv), csv, "manifest lacks column(s) t1ce, flair")


def test_unknown_layout_and_empty_cohort(tmp_path):
    (tmp_path / "empty").mkdir()
    write_nifti(tmp_path / "bids" / "sub-01" / "anat" / "sub-01_T1w.nii.gz", brain_like())
    res = run(tmp_path / "empty", tmp_path / "bids")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    # Problems of every cohort are reported together, one line each.
    assert lines == [
        f"aad-inspect: error: {tmp_path / 'empty'}: empty cohort (the folder is empty)",
        lines[1],
    ]
    assert lines[1].startswith(f"aad-inspect: error: {tmp_path / 'bids'}: no known layout matched")


def test_several_problems_one_line_each(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=3)
    a = write_nifti(sid_file(root, 0, "t2"), np.zeros(SHAPE, np.float32))
    data = brain_like()
    data[0, 0, 0] = np.nan
    b = write_nifti(sid_file(root, 2, "t1"), data)
    res = run(root)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        f"aad-inspect: error: {a}: all voxels are zero (empty volume)",
        f"aad-inspect: error: {b}: 1 NaN and 0 Inf voxels",
    ]


def test_skip_invalid_warns_and_succeeds(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=3)
    bad = write_nifti(sid_file(root, 2, "flair"), np.zeros(SHAPE, np.float32))
    out = tmp_path / "fp.json"
    res = run(root, "--skip-invalid", "--json", out)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == [
        f"aad-inspect: warning: {root}: skipped 1 of 3 subjects with problems:",
        f"aad-inspect: warning:   {bad}: all voxels are zero (empty volume)",
    ]
    (fp,) = json.loads(out.read_text())["cohorts"]
    assert fp["n_subjects"] == 2 and fp["n_skipped"] == 1
    assert "1 skipped" in res.stdout


def test_verbose_shows_traceback(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=1)
    sid_file(root, 0, "t1").write_text("x")
    res = run(root, "-v")
    assert res.returncode != 0 and "Traceback" in res.stderr and "CohortError" in res.stderr


def test_existing_json_untouched_on_error(tmp_path):
    root = write_brats_cohort(tmp_path / "c", n=1)
    out = tmp_path / "fp.json"
    out.write_text('{"cohorts": []}\n')
    sid_file(root, 0, "t1").write_text("x")
    assert run(root, "--json", out).returncode == 2
    assert out.read_text() == '{"cohorts": []}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "fp.json"]


def test_unreadable_file_in_process(tmp_path, monkeypatch, capsys):
    # Tests run as root (chmod 000 does not stop root), so deny this one file at the access
    # check in-process; ordinary users get the same line from the real permission bits.
    root = write_brats_cohort(tmp_path / "c", n=2)
    bad = sid_file(root, 1, "t2")
    bad.chmod(0)
    real = os.access
    monkeypatch.setattr(io.os, "access", lambda p, m, *a, **k: Path(p) != bad and real(p, m))
    monkeypatch.setenv("AAD_MED_VERBOSE", "0")
    assert cli.main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err == f"aad-inspect: error: {bad}: permission denied (file is not readable)\n"


def test_headers_only_and_max_subjects(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AAD_MED_VERBOSE", "0")
    root = write_brats_cohort(tmp_path / "c", n=3)
    data = brain_like()
    data[0, 0, 0] = np.inf  # only a voxel check sees this
    write_nifti(sid_file(root, 0, "t1"), data)
    out = tmp_path / "fp.json"
    assert cli.main([str(root), "--headers-only", "--json", str(out)]) == 0
    (fp,) = json.loads(out.read_text())["cohorts"]
    assert fp["n_subjects"] == 3 and fp["n_fingerprinted"] == 0
    assert fp["intensity"]["t1"]["mean"] is None
    assert cli.main([str(root), "--max-subjects", "0"]) == 2
    assert "--max-subjects: must be at least 1" in capsys.readouterr().err


def test_json_path_is_a_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AAD_MED_VERBOSE", "0")
    root = write_brats_cohort(tmp_path / "c", n=1)
    assert cli.main([str(root), "--json", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"aad-inspect: error: {tmp_path}: is a folder; --json needs a file path\n"
    )
