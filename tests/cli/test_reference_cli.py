"""``aad-reference`` from the command line: ``--version``, ``--help`` (usage and example), ``fit``
writing REF.json + REF.npz, refusing to overwrite them, one-line errors with exit code 2 and
nothing written; ``aad-compare reference=REF`` refusing a broken reference file the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from checkpoint_factory import write_tiny_checkpoint

import aad_med
from aad_med.data.synthetic import generate_cohort

SHAPE = (32, 36, 28)


def run(module: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AAD_MED_VERBOSE": "0", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", f"aad_med.cli.{module}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference_cli")
    generate_cohort(root / "site", 4, "reference", seed=3, shape=SHAPE, id_prefix="R_")
    return {"root": root, "ckpt": write_tiny_checkpoint(root / "ckpt.pt")}


def test_version_and_help():
    proc = run("reference", "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"aad-reference {aad_med.__version__}"
    proc = run("reference", "--help")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0].startswith("usage: aad-reference fit ")
    assert lines[2] == "example:" and lines[3].strip().startswith("aad-reference fit ")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["bogus"], "unknown subcommand 'bogus'"),
        (["fit", "cohort=x", "out=y"], "checkpoint=... required"),
        (["fit", "checkpoint=a", "cohort=b", "out=c", "colour=red"], "unknown key 'colour'"),
        (["fit", "checkpoint=a", "cohort=b", "out=c", "overwrite=maybe"], "true or false"),
    ],
)
def test_argument_errors_one_line(args, expected, tmp_path):
    proc = run("reference", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aad-reference: error: ")
    assert expected in proc.stderr and list(tmp_path.iterdir()) == []


def test_fit_writes_refuses_overwrite_and_missing_inputs(inputs, tmp_path):
    ref = tmp_path / "ref"
    args = [f"checkpoint={inputs['ckpt']}", f"cohort={inputs['root'] / 'site'}", f"out={ref}"]
    proc = run("reference", "fit", *args, "embedding.cache=false", "embedding.progress=false")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "ref.json").read_text())
    assert meta["subject_ids"] == [f"R_{i:05d}" for i in range(4)]
    before = (tmp_path / "ref.npz").read_bytes()
    proc = run("reference", "fit", *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "ref.json: already exists" in proc.stderr
    assert (tmp_path / "ref.npz").read_bytes() == before
    # A missing checkpoint is named; nothing is written.
    proc = run(
        "reference",
        "fit",
        f"checkpoint={tmp_path / 'nope.pt'}",
        f"cohort={inputs['root'] / 'site'}",
        f"out={tmp_path / 'other'}",
    )
    assert proc.returncode == 2 and "nope.pt: checkpoint does not exist" in proc.stderr
    assert not list(tmp_path.glob("other*"))
    # aad-compare with a tampered reference: one line naming the file, no run folder.
    (tmp_path / "ref.npz").write_bytes(before[: len(before) // 2])
    out = tmp_path / "run"
    proc = run(
        "compare",
        f"checkpoint={inputs['ckpt']}",
        f"reference={tmp_path / 'ref.json'}",
        f"cohorts.new={inputs['root'] / 'site'}",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ref.npz: SHA-256 differs" in lines[0]
    assert not out.exists()
