"""Every bad input of issue 7 through the console scripts ``aad-inspect``, ``aad-train`` and
``aad-compare``, each in a subprocess as users call them: a non-zero exit, one
``prog: error: ...`` line naming the offending file (or folder) and the problem, no traceback
(unless verbose), and nothing written to the output folder (``--json`` file or run folder).

Each case's cohort is built once (in a module-scoped tmp dir) and only read by the three tools.
The unreadable file is made unreadable for real: tests run as root, who reads ``chmod 000``
files through the CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH capabilities, so the subprocess drops
them from its capability bounding set before ``exec`` (``prctl(PR_CAPBSET_DROP)``) and the
kernel then refuses the file as it would for any user. Where that is not allowed, the case runs
in-process through the script's ``main()`` with ``os.access`` denying that one file.
"""

from __future__ import annotations

import csv
import ctypes
import gzip
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_factory import write_tiny_checkpoint

from aad_med.data import io
from aad_med.pipelines.compare import RESULT_PATTERNS as COMPARE_RESULTS
from aad_med.pipelines.rundir import RESULT_PATTERNS as TRAIN_RESULTS
from aad_med.pipelines.rundir import existing_results
from tests.cli.conftest import CLI_ENV, run_cli
from tests.nifti_factory import (
    brain_like,
    truncate_file,
    tumour_like,
    write_absurd_header,
    write_brats_cohort,
    write_brats_subject,
    write_csv_cohort,
    write_csv_manifest,
    write_nifti,
)
from tests.training.conftest import tiny_overrides

SHAPE = (24, 28, 20)
TOOLS = ("inspect", "train", "compare")
PROG = {tool: f"aad-{tool}" for tool in TOOLS}


def brats_file(root: Path, i: int, ch: str) -> Path:
    sid = f"BraTS2021_{i:05d}"
    return root / sid / f"{sid}_{ch}.nii.gz"


def cohort(root: Path, n: int = 2) -> Path:
    return write_brats_cohort(root / "cohort", n=n)


# -- the cases: each builds a cohort in `root` and says which file is bad and why -----------


@dataclass(frozen=True)
class Built:
    cohort: Path
    offender: Path
    problem: str
    checkpoint: Path | None = None
    unreadable: bool = False


def truncated(root: Path) -> Built:
    c = cohort(root)
    return Built(c, truncate_file(brats_file(c, 1, "t2"), 0.5), "truncated or corrupt file")


def truncated_header(root: Path) -> Built:
    c = cohort(root)
    bad = brats_file(c, 0, "t1")
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:200]))
    return Built(c, bad, "not a readable NIfTI file")


def not_nifti(root: Path) -> Built:
    c = cohort(root)
    bad = brats_file(c, 0, "flair")
    bad.write_text("<html>404 Not Found</html>")
    return Built(c, bad, "not a readable NIfTI file")


def image_2d(root: Path) -> Built:
    c = cohort(root)
    bad = write_nifti(brats_file(c, 1, "t1"), np.ones(SHAPE[:2], np.float32))
    return Built(c, bad, "expected a 3D image, got 2D with shape (24, 28)")


def image_5d(root: Path) -> Built:
    c = cohort(root)
    bad = write_nifti(brats_file(c, 1, "t1ce"), np.ones((*SHAPE, 2, 2), np.float32))
    return Built(c, bad, "expected a 3D image, got 5D with shape (24, 28, 20, 2, 2)")


def different_shapes(root: Path) -> Built:
    c = cohort(root)
    bad = write_nifti(brats_file(c, 1, "t2"), brain_like((24, 28, 21)))
    return Built(c, bad, "t2 shape (24, 28, 21) differs from t1 shape (24, 28, 20)")


def different_affines(root: Path) -> Built:
    c = cohort(root)
    affine = np.eye(4)
    affine[0, 3] = 2.5
    bad = write_nifti(brats_file(c, 0, "flair"), brain_like(), affine=affine)
    return Built(c, bad, "flair affine differs from t1")


def nan_voxels(root: Path) -> Built:
    c = cohort(root)
    data = brain_like()
    data[1, 2, 3] = np.nan
    return Built(c, write_nifti(brats_file(c, 1, "t1ce"), data), "1 NaN and 0 Inf voxels")


def inf_voxels(root: Path) -> Built:
    c = cohort(root)
    data = brain_like()
    data[4, 5, 6:8] = -np.inf
    return Built(c, write_nifti(brats_file(c, 0, "t1"), data), "0 NaN and 2 Inf voxels")


def all_zero(root: Path) -> Built:
    c = cohort(root)
    bad = write_nifti(brats_file(c, 0, "t2"), np.zeros(SHAPE, np.float32))
    return Built(c, bad, "all voxels are zero (empty volume)")


def missing_modality(root: Path) -> Built:
    c = cohort(root)
    brats_file(c, 1, "t1ce").unlink()
    return Built(c, c / "BraTS2021_00001", "missing modality t1ce")


def duplicate_id_csv(root: Path) -> Built:
    manifest = write_csv_cohort(root / "site", n=2)
    rows = list(csv.reader(manifest.open()))
    with manifest.open("a", newline="") as fh:
        csv.writer(fh).writerow(rows[2])  # case01 listed twice
    return Built(manifest, manifest, "duplicate subject ID 'case01' (2 entries)")


def duplicate_id_folders(root: Path) -> Built:
    c = cohort(root)
    copy = c / "BraTS2021_00001 (copy)"
    shutil.copytree(c / "BraTS2021_00001", copy)
    return Built(c, copy, "duplicate subject ID 'BraTS2021_00001'")


def empty_cohort(root: Path) -> Built:
    (root / "empty").mkdir()
    return Built(root / "empty", root / "empty", "empty cohort")


def one_subject(root: Path) -> Built:
    c = cohort(root, n=1)
    return Built(c, c, "has 1 valid subject(s); comparing cohorts needs at least 2")


def unknown_layout(root: Path) -> Built:
    folder = root / "bids"
    write_nifti(folder / "sub-01" / "anat" / "sub-01_T1w.nii.gz", brain_like())
    return Built(folder, folder, "no known layout matched")


def absurd_header(root: Path) -> Built:
    c = cohort(root)
    gz = brats_file(c, 1, "t2")
    bad = write_absurd_header(gz.with_suffix(""), dims=(32767, 32767, 32767))
    gz.unlink()
    return Built(c, bad, "refusing to allocate")


def unreadable(root: Path) -> Built:
    c = cohort(root)
    bad = brats_file(c, 1, "flair")
    bad.chmod(0)
    return Built(c, bad, "permission denied (file is not readable)", unreadable=True)


def seg_labels(root: Path) -> Built:
    c = cohort(root)
    seg = tumour_like()
    seg[0, 0, :2] = [5, 255]
    bad = write_nifti(brats_file(c, 1, "seg"), seg, dtype=np.int16)
    return Built(c, bad, "segmentation labels {5, 255} outside {0, 1, 2, 3, 4}")


def mixed_layouts(root: Path) -> Built:
    folder = root / "mixed"
    write_brats_subject(folder, "BraTS2021_00001")
    write_brats_subject(folder, "BraTS-GLI-00002-000", layout="brats2023")
    return Built(folder, folder, "cohort mixes layouts")


def csv_missing_columns(root: Path) -> Built:
    manifest = write_csv_manifest(root / "m.csv", [], columns=("subject_id", "t1", "t2"))
    return Built(manifest, manifest, "manifest lacks column(s) t1ce, flair")


def csv_missing_path(root: Path) -> Built:
    manifest = write_csv_cohort(root / "site", n=2)
    gone = root / "site" / "images" / "case01_t2_scan.nii.gz"
    gone.unlink()
    return Built(manifest, gone, f"{manifest}: line 3 (case01): t2 file {gone} does not exist")


def checkpoint_patch_size(root: Path) -> Built:
    # The model was built for 8³ patches; the recorded preprocessing cuts 16³ ones.
    ckpt = write_tiny_checkpoint(root / "patch16.pt", patch_size=16)
    return Built(
        cohort(root),
        ckpt,
        "model expects 8-voxel patches but the preprocessing cuts 16-voxel patches",
        checkpoint=ckpt,
    )


def checkpoint_channels(root: Path) -> Built:
    ckpt = write_tiny_checkpoint(root / "three_channels.pt", channels=["t1", "t1ce", "flair"])
    return Built(cohort(root), ckpt, "invalid preprocessing record (channels must be", ckpt)


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Built]
    tools: tuple[str, ...] = TOOLS


CASES = {
    "truncated_gz": Case(truncated),
    "truncated_header": Case(truncated_header),
    "not_nifti": Case(not_nifti),
    "2d_image": Case(image_2d),
    "5d_image": Case(image_5d),
    "different_shapes": Case(different_shapes),
    "different_affines": Case(different_affines),
    "nan_voxels": Case(nan_voxels),
    "inf_voxels": Case(inf_voxels),
    "all_zero_volume": Case(all_zero),
    "missing_modality": Case(missing_modality),
    "duplicate_id_csv": Case(duplicate_id_csv),
    "duplicate_id_folders": Case(duplicate_id_folders),
    "empty_cohort": Case(empty_cohort),
    "one_subject": Case(one_subject, ("compare",)),
    "unknown_layout": Case(unknown_layout),
    "absurd_header": Case(absurd_header),
    "unreadable_file": Case(unreadable),
    "seg_unexpected_labels": Case(seg_labels),
    "mixed_layouts": Case(mixed_layouts),
    "csv_missing_columns": Case(csv_missing_columns),
    "csv_missing_path": Case(csv_missing_path),
    "checkpoint_patch_size": Case(checkpoint_patch_size, ("compare",)),
    "checkpoint_channels": Case(checkpoint_channels, ("compare",)),
}
SLOW = {"train", "checkpoint_patch_size", "checkpoint_channels"}
"""aad-train imports torch and MONAI before it validates (~5 s of CPU per case), as does
aad-compare for the checkpoint cases; aad-inspect and the other aad-compare cases take ~1 s."""
PARAMS = [
    pytest.param(
        name,
        tool,
        id=f"{tool}-{name}",
        marks=[pytest.mark.slow] if {tool, name} & SLOW else [],
    )
    for name, case in CASES.items()
    for tool in case.tools
]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Callable[[str], Built]:
    """Each case's input, built on first use and shared (read-only) by the tools."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = CASES[name].build(tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def good_cohort(tmp_path_factory) -> Path:
    """The valid cohort the bad one is compared with."""
    return write_brats_cohort(tmp_path_factory.mktemp("good") / "good", n=2, scale=1.2)


def command_line(tool: str, b: Built, out: Path, good: Path, checkpoint: Path) -> list[str]:
    if tool == "inspect":
        return [str(b.cohort), "--json", str(out / "fingerprint.json")]
    if tool == "train":
        return [*tiny_overrides(b.cohort, out.parent, **{"trainer.max_epochs": 1}),
                f"hydra.run.dir={out}"]  # fmt: skip
    return [
        f"checkpoint={b.checkpoint or checkpoint}",
        f"cohorts.good={good}",
        f"cohorts.bad={b.cohort}",
        "embedding.cache=false",
        f"hydra.run.dir={out}",
    ]


# -- running the unreadable case honestly ----------------------------------------------------

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_file_permission_override() -> None:
    """In the child before ``exec``: lose root's power to read any file (see module doc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def _kernel_refuses(path: Path) -> bool:
    """Whether a subprocess started by :func:`run_tool` is refused reading ``path``."""
    try:
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(path)!r}, 'rb')"],
            preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.SubprocessError:  # prctl refused in the child
        return False
    return probe.returncode == 1 and "PermissionError" in probe.stderr


def run_tool(tool: str, args: list[str], unreadable: bool) -> subprocess.CompletedProcess:
    if unreadable and os.geteuid() == 0:
        return subprocess.run(
            [sys.executable, "-m", f"aad_med.cli.{tool}", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=CLI_ENV,
            preexec_fn=_drop_file_permission_override,
        )
    return run_cli(tool, args)


def run_in_process(tool: str, args: list[str], bad: Path, monkeypatch, capsys):
    """The script's ``main()`` in this process, ``os.access`` denying ``bad`` (as root)."""
    real = os.access
    monkeypatch.setattr(io.os, "access", lambda p, m, *a, **k: Path(p) != bad and real(p, m))
    monkeypatch.setenv("AAD_MED_VERBOSE", "0")
    monkeypatch.setattr(sys, "argv", [PROG[tool], *args])
    module = __import__(f"aad_med.cli.{tool}", fromlist=["main"])
    try:
        rc = module.main(args) if tool == "inspect" else module.main()
    except SystemExit as e:
        rc = e.code
    return subprocess.CompletedProcess(args, rc, "", capsys.readouterr().err)


# -- the checks -------------------------------------------------------------------------------


def assert_refused(proc: subprocess.CompletedProcess, tool: str, b: Built) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    (line,) = lines
    assert line.startswith(f"{PROG[tool]}: error: "), line
    assert str(b.offender) in line, line
    assert b.problem in line, line
    return line


def assert_nothing_written(tool: str, out: Path) -> None:
    if out.exists():
        patterns = {"train": TRAIN_RESULTS, "compare": COMPARE_RESULTS, "inspect": ("*",)}[tool]
        assert existing_results(out, patterns) == [], sorted(out.rglob("*"))
    # Neither tool leaves an empty run folder (.hydra/ and its log) behind after a failure.
    assert not out.exists(), sorted(out.rglob("*"))


@pytest.mark.parametrize(("name", "tool"), PARAMS)
def test_bad_input_is_one_line_naming_the_file(
    name, tool, built, good_cohort, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    b = built(name)
    out = tmp_path / "out"
    args = command_line(tool, b, out, good_cohort, tiny_checkpoint)
    if b.unreadable and not _kernel_refuses(b.offender):
        # Only where root cannot give up its file-permission override (see module doc).
        proc = run_in_process(tool, args, b.offender, monkeypatch, capsys)
    else:
        proc = run_tool(tool, args, b.unreadable)
    line = assert_refused(proc, tool, b)
    if tool == "compare" and b.checkpoint is None:
        assert line.startswith("aad-compare: error: cohort bad: "), line
    assert_nothing_written(tool, out)


@pytest.mark.parametrize("tool", TOOLS)
def test_unreadable_file_in_process(tool, built, good_cohort, tiny_checkpoint, tmp_path,
                                    monkeypatch, capsys):  # fmt: skip
    """The same case through each script's ``main()`` with the access check denying the file:
    the path taken where the kernel cannot be made to refuse it."""
    b = built("unreadable_file")
    out = tmp_path / "out"
    args = command_line(tool, b, out, good_cohort, tiny_checkpoint)
    assert_refused(run_in_process(tool, args, b.offender, monkeypatch, capsys), tool, b)
    assert_nothing_written(tool, out)


@pytest.mark.parametrize(
    ("tool", "flag"),
    [
        ("inspect", "-v"),
        ("inspect", "--verbose"),
        pytest.param("train", "verbose=true", marks=pytest.mark.slow),
        pytest.param("train", "--verbose", marks=pytest.mark.slow),
        ("compare", "verbose=true"),
        ("compare", "--verbose"),
        ("compare", "-v"),
    ],
)
def test_verbose_shows_the_traceback(tool, flag, built, good_cohort, tiny_checkpoint, tmp_path):
    b = built("truncated_gz")
    args = command_line(tool, b, tmp_path / "out", good_cohort, tiny_checkpoint)
    proc = run_cli(tool, [*args, flag])
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CohortError" in proc.stderr, proc.stderr[-2000:]
    assert str(b.offender) in proc.stderr
    assert "unrecognized arguments" not in proc.stderr


def test_several_problems_one_line_each_through_compare(
    built, good_cohort, tiny_checkpoint, tmp_path
):
    """Problems of every cohort are reported together, one line each, each naming its file."""
    cases = ("nan_voxels", "missing_modality", "unknown_layout")
    args = [f"checkpoint={tiny_checkpoint}", f"cohorts.good={good_cohort}"]
    args += [f"cohorts.{name}={built(name).cohort}" for name in cases]
    proc = run_cli("compare", [*args, f"hydra.run.dir={tmp_path / 'out'}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, lines
    for line, name in zip(lines, cases, strict=True):
        b = built(name)
        assert line.startswith(f"aad-compare: error: cohort {name}: {b.offender}"), line
        assert b.problem in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_several_problems_one_line_each_through_train(built, tmp_path):
    """aad-train checks every cohort before reporting, like aad-inspect and aad-compare."""
    cases = ("all_zero_volume", "csv_missing_columns", "empty_cohort")
    cohorts = ",".join(str(built(name).cohort) for name in cases)
    out = tmp_path / "out"
    args = tiny_overrides(built(cases[0]).cohort, tmp_path, **{"data.cohorts": f"[{cohorts}]"})
    proc = run_cli("train", [*args, f"hydra.run.dir={out}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, lines
    for line, name in zip(lines, cases, strict=True):
        b = built(name)
        assert line.startswith(f"aad-train: error: {b.offender}"), line
        assert b.problem in line
    assert not out.exists()


def test_tiny_checkpoint_itself_is_valid(tiny_checkpoint):
    """The refusals above come from the bad inputs, not from the shared checkpoint."""
    from aad_med.training.checkpoint import load_model_from_checkpoint

    model, pre, _ = load_model_from_checkpoint(tiny_checkpoint)
    assert pre.patch_size == 8 and model.encode(torch.zeros(1, 4, 8, 8, 8)).shape == (1, 4)
