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

from aad_med import DEFAULT_FEATURES
from aad_med.calibration import CALIBRATION_COLUMNS, equivalent_severity
from aad_med.cli import calibrate as calibrate_cli
from aad_med.data.synthetic import generate_cohort
from aad_med.resources import CONFIG_DIR
from tests.calibration.conftest import SHAPE


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
        assert 1 / 200 <= p <= 1 and float(r["aad"]) > 0 and float(r["aad_mahalanobis"]) > 0
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
    # The default features of the (8, 16)-channel tiny encoder.
    assert npz["vectors"].shape == (5, 8, 2 * (8 + 16) + 4 * 3 + 4 * (9 + 2))
    assert info["settings"]["features"] == DEFAULT_FEATURES
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

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
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

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("calibrate", overrides=["checkpoint=c.pt", "reference=r", *QUICK])
        s = calibrate_cli.settings_from_config(cfg)
        assert s.artefacts == ["noise", "blur"] and s.n_per_cohort is None
        assert s.severities["noise"] == [0.05, 0.2] and s.n_permutations == 199
        assert s.repeats == 3 and s.fraction_affected == 1.0
        assert s.features == DEFAULT_FEATURES  # configs/embedding/default.yaml
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
                    "shifts=quick",
                    "n_per_cohort=[5,10]",
                ],
            )
        )
        assert quick.artefacts == ["noise", "blur", "bias"] and quick.n_per_cohort == [5, 10]
        assert quick.repeats == 5


# --------------------------------------------------------------------------------------------
# aad-compare calibration=PATH: equivalent severities in distances.json and the report


def aad_compare() -> str:
    exe = Path(sys.executable).with_name("aad-compare")
    return str(exe) if exe.exists() else shutil.which("aad-compare")


@pytest.fixture(scope="module")
def compared(calibrated, calib_data, tmp_path_factory) -> dict:
    """aad-compare with the calibrated checkpoint, a clean site and a noisier one (4 each)."""
    root = tmp_path_factory.mktemp("compare_calibrated")
    site_a = generate_cohort(root / "a", 4, "reference", seed=21, shape=SHAPE, id_prefix="CA_")
    site_b = generate_cohort(root / "b", 4, "noise", seed=22, shape=SHAPE, id_prefix="CB_")
    out = root / "run"
    env = {**os.environ, "AAD_MED_VERBOSE": "0", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [
            aad_compare(),
            f"checkpoint={calib_data['ckpt']}",
            f"cohorts.clean={site_a}",
            f"cohorts.noisy={site_b}",
            f"calibration={calibrated['out'] / 'calibration.json'}",
            "stats.n_permutations=99",
            "stats.n_bootstrap=50",
            "stats.bands_bootstrap=20",
            "decode_means=false",
            "regional=false",
            "embedding.cache=false",
            f"hydra.run.dir={out}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "result": json.loads((out / "distances.json").read_text())}


@pytest.mark.slow
def test_compare_reports_equivalent_severities(compared, calibrated):
    res = compared["result"]
    pair = res["pairs"][0]
    eq = pair["equivalent_severity"]
    assert eq["statistic"] == "aad" and eq["features"] == DEFAULT_FEATURES
    assert eq["value"] == pair["aad"] and eq["n_per_cohort"] == 4.0
    assert set(eq["severity"]) == {"noise", "blur"}
    assert [line.split(":")[0] for line in eq["statements"]] == ["noise", "blur"]
    for line in eq["statements"]:
        assert "curve at 4 subjects per cohort" in line
    # Same checkpoint and features: only the note that standardised features scale differently.
    assert len(eq["warnings"]) == 1 and "approximate" in eq["warnings"][0]
    assert res["calibration"]["path"] == str((calibrated["out"] / "calibration.json").resolve())
    assert res["calibration"]["features"] == DEFAULT_FEATURES
    md = (compared["out"] / "report.md").read_text()
    assert "### What this AAD is comparable to" in md
    assert f"- {eq['statements'][0]}" in md and "read the equivalence as approximate" in md
    html = (compared["out"] / "report.html").read_text()
    assert "What this AAD is comparable to" in html and "<li>noise:" in html


def _fake_pairs(result: dict) -> dict:
    keep = ("a", "b", "n_a", "n_b", "aad", "latent_aad")
    return {
        "features": result["features"],
        "checkpoint_sha256": result["checkpoint_sha256"],
        "pairs": [{k: p[k] for k in keep if k in p} for p in result["pairs"]],
    }


@pytest.mark.slow
def test_equivalence_warns_about_another_checkpoint_or_feature_set(compared, calibrated, tmp_path):
    from aad_med.calibration.equivalence import add_equivalent_severity

    calibration = calibrated["out"] / "calibration.json"
    other = _fake_pairs(compared["result"])
    other["checkpoint_sha256"] = "0" * 64
    add_equivalent_severity(other, calibration)
    warnings = other["pairs"][0]["equivalent_severity"]["warnings"]
    assert any("made with another checkpoint" in w for w in warnings), warnings
    # Another feature set: said so, and the comparison's own AAD is still what is looked up.
    latent_only = _fake_pairs(compared["result"])
    latent_only["features"] = "latent"
    latent_only["pairs"][0].pop("latent_aad")
    add_equivalent_severity(latent_only, calibration)
    eq = latent_only["pairs"][0]["equivalent_severity"]
    assert eq["statistic"] == "aad"
    assert any(f"made with features {DEFAULT_FEATURES}" in w for w in eq["warnings"]), eq
    # A latent calibration with a multiscale+texture comparison: the seed's latent AAD is used.
    doc = json.loads(calibration.read_text())
    doc["settings"]["features"] = "latent"
    latent_cal = tmp_path / "calibration.json"
    latent_cal.write_text(json.dumps(doc))
    res = _fake_pairs(compared["result"])
    add_equivalent_severity(res, latent_cal)
    eq = res["pairs"][0]["equivalent_severity"]
    assert eq["statistic"] == "latent_aad" and eq["features"] == "latent"
    assert eq["value"] == res["pairs"][0]["latent_aad"] and eq["warnings"] == []
    # Both on the checkpoint's fixed scale (aad-train's feature_reference): no approximation.
    doc = json.loads(calibration.read_text())
    assert doc["scale"] == "pooled"  # the tiny test checkpoint stores no reference
    doc["scale"] = "checkpoint"
    fixed_cal = tmp_path / "fixed" / "calibration.json"
    fixed_cal.parent.mkdir()
    fixed_cal.write_text(json.dumps(doc))
    res = _fake_pairs(compared["result"])
    res["scale"] = "checkpoint"
    add_equivalent_severity(res, fixed_cal)
    assert res["pairs"][0]["equivalent_severity"]["warnings"] == []
    res = _fake_pairs(compared["result"])
    res["scale"] = "pooled"
    add_equivalent_severity(res, fixed_cal)
    assert any("approximate" in w for w in res["pairs"][0]["equivalent_severity"]["warnings"])
    # A calibration.csv records neither checkpoint nor features: the report says so.
    res = _fake_pairs(compared["result"])
    add_equivalent_severity(res, calibrated["out"] / "calibration.csv")
    warnings = res["pairs"][0]["equivalent_severity"]["warnings"]
    assert any("records neither the checkpoint nor the features" in w for w in warnings)


def test_compare_refuses_a_missing_or_bad_calibration_before_encoding(tmp_path):
    from aad_med.errors import InputError
    from aad_med.pipelines.compare import CompareSettings, run_comparison
    from tests.nifti_factory import write_brats_cohort

    a = write_brats_cohort(tmp_path / "a", n=2)
    b = write_brats_cohort(tmp_path / "b", n=2)
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"never loaded")
    for path, problem in (
        (tmp_path / "none.json", "calibration file does not exist"),
        (tmp_path / "bad.csv", "not a calibration table"),
    ):
        if path.suffix == ".csv":
            path.write_text("x,y\n1,2\n")
        with pytest.raises(InputError) as err:
            run_comparison(
                ckpt,
                {"a": a, "b": b},
                tmp_path / "out",
                CompareSettings(calibration=path, progress=False),
            )
        assert str(err.value).startswith(f"{path}: {problem}")
        assert not (tmp_path / "out").exists()
