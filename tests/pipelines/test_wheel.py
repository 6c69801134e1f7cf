"""Installable anywhere: a wheel built from the repository and installed WITHOUT ``-e`` into a
fresh virtual environment runs aad-synth, aad-train, aad-compare and aad-calibrate from an
unrelated working directory, reading its configs from the installed wheel.

The fresh venv reaches the heavy dependencies (torch, MONAI, ...) of the test's own environment
through a ``.pth`` line naming that environment's site-packages. Python only executes ``.pth``
files found in a *site* directory, so the editable-install hooks living in the test
environment's site-packages are never run: ``aad_med`` can come from the wheel alone, and the
test asserts that it (and ``CONFIG_DIR``) does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

import aad_med

ROOT = Path(aad_med.__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _has_build_backend() -> bool:
    try:
        major = int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77


@pytest.mark.slow
def test_wheel_installed_without_editable_runs_every_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "AAD_MED_VERBOSE": "1"})
    env["AAD_MED_CACHE"] = str(tmp_path / "cache")
    wheels = tmp_path / "wheels"
    # Without build isolation when this environment has a recent enough setuptools (works
    # offline); otherwise pip fetches the build backend as usual.
    isolation = ["--no-build-isolation"] if _has_build_backend() else []
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            *isolation,
            "-w",
            str(wheels),
            "-q",
        ],
        tmp_path,
        env,
    )
    (wheel,) = wheels.glob("aad_med-*.whl")
    venv = tmp_path / "venv"
    # No pip inside (ensurepip is missing from some system Pythons): this environment's pip
    # installs into it with --python.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    py = bin_dir / "python"
    site = _run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
    ).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    Path(site, "test_dependencies.pth").write_text(deps + "\n")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        tmp_path,
        env,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [
            str(py),
            "-c",
            "import aad_med, aad_med.resources as r; print(aad_med.__file__); print(r.CONFIG_DIR)",
        ],
        elsewhere,
        env,
    ).stdout.split()
    assert all(Path(p).resolve().is_relative_to(Path(site).resolve()) for p in where), where

    def cli(name, *args, timeout=600):
        return _run([str(bin_dir / name), *args], elsewhere, env, timeout)

    assert cli("aad-compare", "--version").stdout.strip() == f"aad-compare {aad_med.__version__}"
    shape = ["--shape", "24", "28", "20"]
    cli("aad-synth", "site_a", "--n-subjects", "4", "--seed", "1", *shape)
    cli("aad-synth", "site_b", "--n-subjects", "4", "--seed", "2", "--site", "scanner_b", *shape)
    cli("aad-train", "debug=default", "hydra.run.dir=train")
    ckpt = elsewhere / "train" / "checkpoints" / "best.pt"
    assert ckpt.is_file()
    train_prov = json.loads((elsewhere / "train" / "provenance.json").read_text())
    assert train_prov["aad_med"] == aad_med.__version__ and "aad-train" in train_prov["command"]
    cli(
        "aad-compare",
        f"checkpoint={ckpt}",
        "cohorts.a=site_a",
        "cohorts.b=site_b",
        "stats.n_permutations=19",
        "stats.n_bootstrap=20",
        "embedding.progress=false",
        "hydra.run.dir=cmp",
    )
    result = json.loads((elsewhere / "cmp" / "distances.json").read_text())
    prov = result["provenance"]
    assert prov["aad_med"] == aad_med.__version__
    assert set(prov["versions"]) >= {"torch", "monai", "numpy"}
    assert prov["checkpoints"][0]["sha256"] == result["checkpoint_sha256"]
    assert prov["command"].startswith("aad-compare ")
    cli(
        "aad-calibrate",
        f"checkpoint={ckpt}",
        "reference=site_a",
        "artefacts=[noise]",
        "severities.noise=[0.2]",
        "n_per_cohort=[2]",
        "repeats=1",
        "stats.n_permutations=9",
        "save_embeddings=false",
        "embedding.progress=false",
        "hydra.run.dir=cal",
    )
    cal = json.loads((elsewhere / "cal" / "calibration.json").read_text())
    assert cal["provenance"]["checkpoints"][0]["sha256"] == cal["checkpoint_sha256"]
