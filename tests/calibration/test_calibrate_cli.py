"""``aad-calibrate`` as users call it: the installed console script on a tiny reference cohort
with a tiny trained checkpoint writes calibration.csv (the right columns and one row per
condition), calibration.json, the two figures and the embeddings; AAD grows with blur severity;
the config composes; and bad input ends with one ``aad-calibrate: error:`` line and exit 2."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from aad_med.calibration import CALIBRATION_COLUMNS, equivalent_severity
from aad_med.cli import calibrate as calibrate_cli


def aad_calibrate() -> str:
    exe = Path(sys.executable).with_name("aad-calibrate")
    return str(exe) if exe.exists() else shutil.which("aad-calibrate")


def run_cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "AAD_MED_VERBOSE": "0", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [aad_calibrate(), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


QUICK = [
    "artefacts=[noise,blur]",
    "severities.noise=[0.05,0.2]",
    "severities.blur=[1.0,2.0]",
    "repeats=3",
    "stats.n_permutations=199",
    "embedding.progress=false",
]


@pytest.fixture(scope="module")
def calibrated(calib_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("calibrate_run") / "run"
    proc = run_cli(
        [
            f"checkpoint={calib_data['ckpt']}",
            f"reference={calib_data['reference']}",
            *QUICK,
            f"hydra.run.dir={out}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc}


@pytest.mark.slow
def test_console_script_writes_every_output(calibrated):
    out = calibrated["out"]
    with open(out / "calibration.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CALIBRATION_COLUMNS
        rows = list(reader)
    # 8 subjects -> halves of 4 -> sizes 2 and 4; (0 + 2 severities) x 2 artefacts x 3 repeats.
    assert len(rows) == 2 * 3 * 2 * 3
    assert {r["artefact"] for r in rows} == {"noise", "blur"}
    assert {float(r["severity"]) for r in rows if r["artefact"] == "blur"} == {0.0, 1.0, 2.0}
    assert {int(r["n_per_cohort"]) for r in rows} == {2, 4}
    for r in rows:
        p = float(r["aad_p"])
        assert 1 / 200 <= p <= 1 and float(r["aad"]) > 0 and float(r["aad_standardized"]) > 0
        assert r["significant"] == ("true" if p <= 0.05 else "false")
    info = json.loads((out / "calibration.json").read_text())
    assert info["n_reference_subjects"] == 8 and info["n_per_cohort"] == [2, 4]
    assert info["settings"]["n_permutations"] == 199 and info["settings"]["repeats"] == 3
    assert info["artefacts"]["noise"]["severities"] == [0.0, 0.05, 0.2]
    assert "median brain intensity" in info["artefacts"]["noise"]["severity_unit"]
    assert len(info["rows"]) == len(rows) and len(info["summary"]) == 2 * 2 * 3
    assert set(info["minimum_detectable"]) == {"noise", "blur"}
    assert info["train_overlap"] == []
    assert len(info["checkpoint_sha256"]) == 64
    assert info["smallest_attainable_p"] == {"2": pytest.approx(1 / 3), "4": pytest.approx(2 / 70)}
    # n=2 can never reach p <= 0.05: the run says so.
    proc = calibrated["proc"]
    assert "with 2 subjects per cohort no shift can reach p <= 0.05" in proc.stdout + proc.stderr
    # AAD grows with blur (averaged over repeats, the larger cohort size).
    mean = {
        s: np.mean(
            [
                float(r["aad"])
                for r in rows
                if r["artefact"] == "blur"
                and r["n_per_cohort"] == "4"
                and float(r["severity"]) == s
            ]
        )
        for s in (0.0, 2.0)
    }
    assert mean[2.0] > 1.1 * mean[0.0], mean
    for name in ("calibration_curves.png", "power.png"):
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    npz = np.load(out / "calibration_embeddings.npz")
    # The default features, multiscale+texture, of the (8, 16)-channel tiny encoder.
    assert npz["vectors"].shape == (5, 8, 2 * (8 + 16) + 4 + 8 + 16)
    assert info["settings"]["features"] == "multiscale+texture"
    assert list(npz["artefact"]) == ["none", "noise", "noise", "blur", "blur"]
    assert not [p for p in out.iterdir() if p.name.startswith(".calibration_tmp")]
    assert "wrote calibration.csv" in calibrated["proc"].stdout
    # The file feeds the equivalent-severity lookup for aad-compare's report.
    eq = equivalent_severity(out / "calibration.csv", 2 * mean[0.0], n_per_cohort=4)
    assert set(eq) == {"noise", "blur"}
    assert eq["blur"] is None or 0.0 <= eq["blur"] <= 2.0


@pytest.mark.slow
def test_refuses_to_overwrite_results(calibrated, calib_data):
    out = calibrated["out"]
    hydra_before = {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()}
    csv_before = (out / "calibration.csv").read_bytes()
    proc = run_cli(
        [
            f"checkpoint={calib_data['ckpt']}",
            f"reference={calib_data['reference']}",
            *QUICK,
            "seed=7",
            f"hydra.run.dir={out}",
        ]
    )
    assert proc.returncode == 2
    assert _error_lines(proc) == [
        f"aad-calibrate: error: {out}: run folder already holds results (calibration.csv, "
        "calibration.json, calibration_curves.png); replace it with overwrite=true, or choose "
        "another hydra.run.dir"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    # Refused before Hydra wrote into the folder: its record of the first run is untouched.
    assert {p.name: p.read_bytes() for p in (out / ".hydra").iterdir()} == hydra_before
    assert (out / "calibration.csv").read_bytes() == csv_before


def _run_main(args: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["aad-calibrate", *map(str, args)])
    monkeypatch.delenv("AAD_MED_VERBOSE", raising=False)
    with pytest.raises(SystemExit) as exc:
        calibrate_cli.main()
    return exc.value.code


def test_existing_results_refused_before_hydra_writes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "power.png").write_bytes(b"an earlier result")
    code = _run_main(["checkpoint=c.pt", "reference=r", f"hydra.run.dir={out}"], monkeypatch)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aad-calibrate: error: {out}: run folder already holds results (power")
    assert "overwrite=true" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["power.png"]  # no .hydra/, no log


def test_failed_run_leaves_no_new_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code = _run_main(["checkpoint=c.pt", f"hydra.run.dir={out}"], monkeypatch)
    assert code == 2 and "reference=DIR_OR_CSV" in capsys.readouterr().err
    assert not out.exists()
    # A folder that existed before the run is kept, whatever Hydra wrote into it.
    out.mkdir()
    code = _run_main(["checkpoint=c.pt", f"hydra.run.dir={out}"], monkeypatch)
    assert code == 2 and out.is_dir()


@pytest.mark.parametrize("flag", ["-v", "--verbose", "verbose=true"])
def test_verbose_shows_the_traceback(flag, tmp_path):
    proc = run_cli(["checkpoint=c.pt", flag, f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr, proc.stderr[-2000:]
    assert "reference=DIR_OR_CSV" in proc.stderr
    assert "unrecognized arguments" not in proc.stderr


def _error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("aad-calibrate: error:")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["checkpoint=c.pt"], "reference=DIR_OR_CSV (the reference cohort) is required"),
        (["reference=x"], "checkpoint=PATH (a checkpoint written by aad-train) is required"),
        (["checkpoint=c.pt", "reference=x", "artefacts=[ringing]"], "unknown artefact 'ringing';"),
        (["checkpoint=c.pt", "reference=x", "repeats=0"], "repeats must be >= 1"),
        (["checkpoint=c.pt", "reference=x", "fraction_affected=2"], "fraction_affected must be"),
    ],
)
def test_config_errors_name_the_setting(tmp_path, args, message):
    from hydra import compose, initialize_config_dir

    from aad_med.errors import ConfigError

    with initialize_config_dir(config_dir=calibrate_cli.CONFIG_DIR, version_base="1.3"):
        cfg = compose("calibrate", overrides=args)
    with pytest.raises(ConfigError) as err:
        calibrate_cli.calibrate_from_config(cfg, tmp_path / "run")
    assert str(err.value).startswith(message)
    assert not (tmp_path / "run" / "calibration.csv").exists()


def test_console_script_error_is_one_line_exit_2(tmp_path):
    proc = run_cli(["checkpoint=c.pt", f"hydra.run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _error_lines(proc) == [
        "aad-calibrate: error: reference=DIR_OR_CSV (the reference cohort) is required"
    ], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_bad_reference_and_checkpoint_name_the_file(tmp_path, calib_data):
    missing = tmp_path / "nowhere"
    proc = run_cli(
        [
            f"checkpoint={calib_data['ckpt']}",
            f"reference={missing}",
            f"hydra.run.dir={tmp_path / 'r1'}",
        ],
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert any(str(missing) in ln for ln in _error_lines(proc)), proc.stderr
    bad_ckpt = tmp_path / "bad.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    proc = run_cli(
        [
            f"checkpoint={bad_ckpt}",
            f"reference={calib_data['reference']}",
            *QUICK,
            f"hydra.run.dir={tmp_path / 'r2'}",
        ],
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = _error_lines(proc)
    assert len(lines) == 1 and str(bad_ckpt) in lines[0]
    assert not (tmp_path / "r2" / "calibration.csv").exists()


def test_config_composes_to_settings():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=calibrate_cli.CONFIG_DIR, version_base="1.3"):
        cfg = compose("calibrate", overrides=["checkpoint=c.pt", "reference=r", *QUICK])
        s = calibrate_cli.settings_from_config(cfg)
        assert s.artefacts == ["noise", "blur"] and s.n_per_cohort is None
        assert s.severities["noise"] == [0.05, 0.2] and s.n_permutations == 199
        assert s.repeats == 3 and s.fraction_affected == 1.0
        assert s.features == "multiscale+texture"  # configs/embedding/default.yaml
        latent = calibrate_cli.settings_from_config(
            compose(
                "calibrate",
                overrides=["checkpoint=c.pt", "reference=r", "embedding.features=latent"],
            )
        )
        assert latent.features == "latent"
        full = calibrate_cli.settings_from_config(
            compose("calibrate", overrides=["checkpoint=c.pt", "reference=r"])
        )
        assert full.artefacts == ["bias", "noise", "gibbs", "blur", "downsample", "scale", "gamma"]
        assert full.repeats == 20 and full.n_permutations == 999
        quick = calibrate_cli.settings_from_config(
            compose(
                "calibrate",
                overrides=[
                    "checkpoint=c.pt",
                    "reference=r",
                    "calibration=quick",
                    "n_per_cohort=[5,10]",
                ],
            )
        )
        assert quick.artefacts == ["noise", "blur", "bias"] and quick.n_per_cohort == [5, 10]
        assert quick.repeats == 5
