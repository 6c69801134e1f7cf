"""Tests of ``aad-synth``: run as users do (``python -m aad_med.cli.synth`` in a subprocess) and
in-process through ``main(argv)`` for the argument handling."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from aad_med.cli import synth
from aad_med.data.synthetic import BRATS_SHAPE, SITES

SHAPE = ["20", "22", "18"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aad_med.cli.synth", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def flair_of(root, sid="BraTS2021_00000") -> np.ndarray:
    return np.asanyarray(nib.load(root / sid / f"{sid}_flair.nii.gz").dataobj)


def test_writes_a_brats2021_cohort(tmp_path):
    out = tmp_path / "cohort"
    proc = run_cli(str(out), "--n-subjects", "2", "--shape", *SHAPE, "--site", "scanner_b")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "2 subjects" in proc.stdout
    for sid in ("BraTS2021_00000", "BraTS2021_00001"):
        names = sorted(p.name for p in (out / sid).iterdir())
        assert names == sorted(f"{sid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg"))
    assert nib.load(out / "BraTS2021_00000" / "BraTS2021_00000_t1.nii.gz").shape == (20, 22, 18)


def test_set_overrides_a_site_parameter(tmp_path):
    assert synth.main([str(tmp_path / "ref"), "--n-subjects", "1", "--shape", *SHAPE]) == 0
    rc = synth.main(
        [str(tmp_path / "gain"), "--n-subjects", "1", "--shape", *SHAPE, "--set", "scale.flair=2"]
    )
    assert rc == 0
    ref, gain = flair_of(tmp_path / "ref"), flair_of(tmp_path / "gain")
    brain = ref != 0
    assert gain[brain].mean() == pytest.approx(2 * ref[brain].mean(), rel=1e-4)


def test_apply_settings_forms():
    ref = SITES["reference"]
    site = synth.apply_settings(
        ref,
        [
            "noise=0.12",
            "scale=1,1.2,1,1",
            "offset.t2=10",
            "downsample=1,1,3",
            "skull_stripped=false",
        ],
    )
    assert site.noise == 0.12 and site.scale == (1.0, 1.2, 1.0, 1.0)
    assert site.offset == (0.0, 0.0, 10.0, 0.0)
    assert site.downsample_factors == (1.0, 1.0, 3.0) and site.skull_stripped is False
    assert site.name.startswith("reference+")
    assert synth.apply_settings(ref, []) is ref


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "gamma=0"], "gamma must be"),
        (["--set", "noise=lots"], "--set noise=lots"),
        (["--set", "colour=3"], "unknown site parameter"),
        (["--set", "noise"], "expected key=value"),
        (["--set", "gamma.t1=2"], "only scale and offset"),
        (["--set", "scale.t3=2"], "unknown channel"),
        (["--site", "nope"], "unknown site 'nope'"),
        (["--shape", "4", "4", "4"], "shape must be"),
        (["--n-subjects", "0"], "n_subjects"),
        (["--preset", "demo", "--site", "noise"], "--preset demo"),
    ],
)
def test_invalid_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    rc = synth.main([str(tmp_path / "x"), "--shape", *SHAPE, *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("aad-synth: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_input_in_a_subprocess_has_no_traceback(tmp_path):
    proc = run_cli(str(tmp_path / "x"), "--set", "tumour_prevalence=2")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "aad-synth: error: site 'reference+tumour_prevalence': "
        "tumour_prevalence must be between 0 and 1, got 2.0"
    )
    assert not (tmp_path / "x").exists()


def test_out_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("")
    assert synth.main([str(target), "--shape", *SHAPE]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_demo_preset_writes_four_cohorts(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(str(out), "--preset", "demo", "--n-subjects", "2", "--shape", *SHAPE)
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "site_a", "site_a2", "site_b"):
        assert str(out / name) in proc.stdout

    def ids(name):
        return sorted(p.name for p in (out / name).iterdir() if p.is_dir())

    assert ids("site_a") == ["BraTS2021_00000", "BraTS2021_00001"]
    assert ids("site_a2") == ["BraTS2021_00002", "BraTS2021_00003"]
    assert ids("site_b") == ids("site_a")
    assert len(ids("train")) == 4
    # site_b is site_a's subjects seen by another scanner and population: same brain, shifted.
    a, b = flair_of(out / "site_a"), flair_of(out / "site_b")
    assert np.count_nonzero(b) < np.count_nonzero(a)
    # The training cohort uses another seed: not the evaluation subjects.
    assert not np.array_equal(flair_of(out / "train") != 0, a != 0)


def test_brats_size_and_layout_options_reach_the_generator(tmp_path, monkeypatch):
    calls = []

    def fake_generate(out_dir, **kw):
        calls.append(kw)
        return out_dir

    monkeypatch.setattr(synth, "generate_cohort", fake_generate)
    argv = [str(tmp_path), "--brats-size", "--layout", "msd", "--no-seg", "--seed", "3"]
    assert synth.main([*argv, "--start-index", "5", "--id-prefix", "X_"]) == 0
    kw = calls[0]
    assert tuple(kw["shape"]) == BRATS_SHAPE and kw["layout"] == "msd"
    assert kw["with_seg"] is False and kw["seed"] == 3
    assert kw["start_index"] == 5 and kw["id_prefix"] == "X_"
