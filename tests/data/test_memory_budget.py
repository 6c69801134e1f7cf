"""Bounded memory from hostile headers: a decompression bomb (a 2 MB cohort of four 800³
channels), a header-extension bomb (1.5 GB declared in a 1.6 MB file), and a resampled size that
explodes (100 mm voxels, or a 0.01 mm target spacing) are refused from the headers, before any
allocation, with one line naming the file."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aad_med.data.io import (
    EXTENSION_LIMIT_ENV,
    SUBJECT_BUDGET_ENV,
    check_header_extensions,
    load_subject,
    read_header,
    subject_voxel_budget,
)
from aad_med.data.layouts import discover_cohort
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.transforms import deterministic_transforms
from aad_med.data.validation import load_cohort
from aad_med.errors import CohortError, ConfigError, InputError
from tests.data.bombs import write_bomb_cohort
from tests.nifti_factory import brain_like, write_brats_cohort, write_nifti

ROOT = Path(__file__).resolve().parents[2]
MEMORY_CAP = 3 * 1024**3
"""Address-space cap of the bomb runs: an aad-inspect start-up needs well under 1 GB of it; one
800³ channel read as float32 alone is 2 GB and the whole subject 8 GB."""

# Runs aad-inspect under an address-space cap and reports exit code, stderr and peak RSS.
_CAPPED = textwrap.dedent(
    """
    import json, resource, subprocess, sys
    cap, args = int(sys.argv[1]), sys.argv[2:]
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    p = subprocess.run([sys.executable, "-m", "aad_med.cli.inspect", *args],
                       capture_output=True, text=True, preexec_fn=limit, timeout=600)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rc": p.returncode, "stderr": p.stderr, "peak_mb": peak_kb / 1024}))
    """
)


def _capped_inspect(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(SUBJECT_BUDGET_ENV, None)
    env.pop(EXTENSION_LIMIT_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", _CAPPED, str(MEMORY_CAP), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_decompression_bomb_cohort_is_one_line_exit_2_under_a_memory_cap(tmp_path):
    cohort = write_bomb_cohort(tmp_path / "bomb")
    assert sum(p.stat().st_size for p in cohort.rglob("*.nii.gz")) < 4 * 1024**2
    res = _capped_inspect(str(cohort))
    lines = res["stderr"].strip().splitlines()
    assert res["rc"] == 2, res["stderr"]
    assert len(lines) == 1, res["stderr"]
    assert "BraTS2021_00000_" in lines[0] and ".nii.gz" in lines[0]
    assert "per-subject budget" in lines[0] and SUBJECT_BUDGET_ENV in lines[0]
    assert "2,048,000,000 voxels" in lines[0]
    assert res["peak_mb"] < 1024, "headers only: nothing of the 8 GB subject was allocated"


def test_extension_bomb_is_one_line_exit_2_under_a_memory_cap(tmp_path):
    cohort = write_bomb_cohort(
        tmp_path / "ext", shape=(24, 28, 20), extension_bytes=1536 * 1024**2 - 352, bombs=("t2",)
    )
    bomb = next(cohort.rglob("*_t2.nii.gz"))
    assert bomb.stat().st_size < 8 * 1024**2
    res = _capped_inspect(str(cohort))
    lines = res["stderr"].strip().splitlines()
    assert res["rc"] == 2, res["stderr"]
    assert len(lines) == 1, res["stderr"]
    assert str(bomb) in lines[0]
    assert "header extensions declare" in lines[0] and EXTENSION_LIMIT_ENV in lines[0]
    assert res["peak_mb"] < 1024, "the extension was never read"


def _nifti_with_extensions(path: Path, sizes: list[int], gz: bool, vox_offset=None) -> Path:
    """A valid tiny NIfTI-1 whose header declares extensions of ``sizes`` (content zeros)."""
    import gzip

    import nibabel as nib

    data = brain_like((4, 4, 4))
    hdr = nib.Nifti1Image(data, np.eye(4)).header
    raw = bytearray(hdr.binaryblock)
    body = b"".join(struct.pack("<ii", s, 0) + bytes(max(s - 8, 0)) for s in sizes)
    offset = 352 + len(body) if vox_offset is None else vox_offset
    raw[108:112] = struct.pack("<f", float(offset))
    blob = bytes(raw) + b"\x01\x00\x00\x00" + body + data.astype("<f4").tobytes()
    path.write_bytes(gzip.compress(blob, 1) if gz else blob)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_several_extensions_are_summed_against_the_limit(tmp_path, monkeypatch, gz):
    name = "x.nii.gz" if gz else "x.nii"
    path = _nifti_with_extensions(tmp_path / name, [4096, 4096, 4096], gz)
    monkeypatch.setenv(EXTENSION_LIMIT_ENV, "10000")
    with pytest.raises(InputError, match=r"at least 12,288 bytes.*limit 10,000") as e:
        read_header(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv(EXTENSION_LIMIT_ENV, "20000")
    img = read_header(path)
    assert len(img.header.extensions) == 3


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti2_extensions_are_checked_too(tmp_path, monkeypatch, suffix):
    import nibabel as nib

    img = nib.Nifti2Image(brain_like((4, 4, 4)), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, b"x" * 5000))
    path = tmp_path / f"two{suffix}"
    nib.save(img, str(path))
    monkeypatch.setenv(EXTENSION_LIMIT_ENV, "4096")
    with pytest.raises(InputError, match="header extensions declare"):
        read_header(path)
    monkeypatch.setenv(EXTENSION_LIMIT_ENV, "8192")
    assert isinstance(read_header(path), nib.Nifti2Image)


def test_negative_extension_size_is_refused_not_read_to_the_end(tmp_path):
    # nibabel would read(esize - 8) with a negative size: the whole rest of the file.
    path = _nifti_with_extensions(tmp_path / "neg.nii", [32], gz=False)
    raw = bytearray(path.read_bytes())
    raw[352:356] = struct.pack("<i", -5)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="invalid size -5"):
        check_header_extensions(path)


def test_ordinary_files_pass_the_extension_check(tmp_path):
    plain = write_nifti(tmp_path / "a.nii.gz", brain_like((6, 6, 6)))
    check_header_extensions(plain)
    check_header_extensions(_nifti_with_extensions(tmp_path / "b.nii", [32], gz=False))


def test_subject_budget_counts_all_channels_and_is_configurable(tmp_path, monkeypatch):
    # Each 24x28x20 channel is 13,440 voxels: four channels + seg = 67,200.
    cohort = write_brats_cohort(tmp_path / "c", n=1)
    subject = discover_cohort(cohort).subjects[0]
    assert load_subject(subject, max_subject_voxels=67_200).image.shape == (4, 24, 28, 20)
    with pytest.raises(InputError, match=r"67,200 voxels across its 5 images.*budget of 67,199"):
        load_subject(subject, max_subject_voxels=67_199)
    monkeypatch.setenv(SUBJECT_BUDGET_ENV, "60000")
    assert subject_voxel_budget() == 60_000
    with pytest.raises(CohortError, match="per-subject budget of 60,000") as e:
        load_cohort(cohort)
    assert len(e.value.problems) == 1
    monkeypatch.setenv(SUBJECT_BUDGET_ENV, "lots")
    with pytest.raises(ConfigError, match="AAD_MAX_SUBJECT_VOXELS='lots'"):
        subject_voxel_budget()


@pytest.mark.parametrize(
    ("voxel_mm", "target_mm"), [(100.0, 1.0), (1.0, 0.01)], ids=["100mm-voxels", "spacing-0.01"]
)
def test_absurd_resampled_size_is_refused_before_resampling(tmp_path, voxel_mm, target_mm):
    affine = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    root = tmp_path / "c"
    sid = "BraTS2021_00000"
    for suffix in ("t1", "t1ce", "t2", "flair"):
        write_nifti(root / sid / f"{sid}_{suffix}.nii.gz", brain_like((24, 28, 20)), affine)
    subject = discover_cohort(root).subjects[0]
    prep = PreprocessingConfig(spacing=(target_mm,) * 3, patch_size=8)
    with pytest.raises(InputError, match=r"resampled from .* would hold .* per-subject budget"):
        deterministic_transforms(prep)(subject.as_dict())


def test_padding_to_a_huge_patch_counts_in_the_budget(tmp_path):
    cohort = write_brats_cohort(tmp_path / "c", n=1)
    subject = discover_cohort(cohort).subjects[0]
    # 5 images padded to 600³ = 1.08 G voxels; the subject itself is 67 k.
    prep = PreprocessingConfig(patch_size=600)
    with pytest.raises(InputError, match="per-subject budget"):
        deterministic_transforms(prep)(subject.as_dict())
    item = deterministic_transforms(PreprocessingConfig(patch_size=8))(subject.as_dict())
    assert item["image"].shape[0] == 4
