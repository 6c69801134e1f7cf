"""``torchrun --nproc_per_node=2 -m aad_med.cli.compare`` (gloo on CPU): the encoding is sharded
over two processes and the outputs are byte-identical to one process's; a bad cohort is reported
once and no rank hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoint_factory import write_tiny_checkpoint
from tests.nifti_factory import write_brats_cohort

pytestmark = pytest.mark.slow  # two torchrun launches and one plain run, each importing torch

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
ARGS = [
    "device=cpu",
    "cache=off",
    "regional=false",  # regional sums are added in shard order: equal to rounding only
    "stats.n_permutations=99",
    "stats.n_bootstrap=50",
    "stats.bands_bootstrap=20",
]


def compare(args: list[str], nproc: int | None, timeout: float = 240):
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "aad_med.cli.compare",
        ]
        if nproc
        else [sys.executable, "-m", "aad_med.cli.compare"]
    )
    # Own session: on a timeout the launcher *and* its workers are killed, none left waiting.
    proc = subprocess.Popen(
        [*launcher, *args, *ARGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stable(out: Path) -> dict:
    doc = json.loads((out / "distances.json").read_text())
    for key in ("created", "timings"):
        doc.pop(key)
    doc["provenance"].pop("command")
    return doc


def test_two_ranks_write_what_one_process_writes(tmp_path):
    a = write_brats_cohort(tmp_path / "a", n=3)
    b = write_brats_cohort(tmp_path / "b", n=4, scale=1.3)  # odd split: ranks hold 2+1, 2+2
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt.pt")
    common = [f"checkpoint={ckpt}", f"cohorts.a={a}", f"cohorts.b={b}"]
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = compare([*common, f"hydra.run.dir={one}"], None)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = compare([*common, f"hydra.run.dir={two}"], 2)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert stable(one) == stable(two)
    for name in ("embeddings.csv", "intensity_fingerprint.csv", "pairwise_aad.csv"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    # Rank 0 alone reported (one "wrote" line, not two).
    assert (p2.stdout + p2.stderr).count("aad-compare: wrote") == 1


def test_bad_cohort_is_reported_once_and_no_rank_hangs(tmp_path):
    a = write_brats_cohort(tmp_path / "a", n=3)
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt.pt")
    args = [
        f"checkpoint={ckpt}",
        f"cohorts.a={a}",
        f"cohorts.b={tmp_path / 'missing'}",
        f"hydra.run.dir={tmp_path / 'out'}",
    ]
    proc = compare(args, 2, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("missing") >= 1
    assert not (tmp_path / "out" / "distances.json").exists()
