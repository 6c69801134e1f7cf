"""``aad-train`` as users call it: the console script in a subprocess on a tiny cohort, the run
folder it writes, one-line errors, SIGKILL at several points then exact resume, and torchrun
with two gloo processes agreeing with one process."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aad_med.training.checkpoint import load_checkpoint, load_model_from_checkpoint
from tests.nifti_factory import write_brats_cohort
from tests.training.conftest import AUGMENT, tiny_overrides

SCRIPT = Path(sys.executable).with_name("aad-train")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run(args: list[str], script: list[str] | None = None, timeout: float = 300):
    cmd = script or [sys.executable, "-m", "aad_med.cli.train"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=Path.cwd()
    )


@pytest.fixture
def cohort(tmp_path) -> Path:
    return write_brats_cohort(tmp_path / "cohort", n=5)


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model_state"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_console_script_writes_the_whole_run_folder_and_loss_falls(cohort, tmp_path):
    assert SCRIPT.exists(), "the package is installed with its aad-train console script"
    run = tmp_path / "run"
    args = tiny_overrides(
        cohort,
        tmp_path,
        **{
            "trainer.max_epochs": 4,
            "optim.optimizer.lr": 0.01,
            "data.samples_per_subject": 4,
            "logger": "tensorboard",
            "trainer.log_every_n_steps": 1,
        },
    )
    proc = _run([*args, f"hydra.run.dir={run}"], script=[str(SCRIPT)])
    assert proc.returncode == 0, proc.stderr
    for rel in (
        ".hydra/config.yaml",
        "config.yaml",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "train.log",
        "loss_curve.png",
        "reconstructions.png",
    ):
        assert (run / rel).is_file(), rel
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    log = (run / "train.log").read_text()
    epoch_lines = [ln for ln in log.splitlines() if " epoch " in ln and "train_loss" in ln]
    assert len(epoch_lines) == 4, "one line per epoch when not attached to a terminal"
    assert "patches/s" in epoch_lines[0]
    history = load_checkpoint(run / "checkpoints" / "last.pt")["history"]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    # The fixed feature scale aad-compare uses: one pass over the training and validation
    # subjects, stored in best.pt as plain lists (load_checkpoint reads with weights_only).
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    ref = best["feature_reference"]
    assert ref["n_subjects"] == 5 and len(ref["subjects"]) == 5
    for block in ("multiscale", "input_texture", "intensity_shape", "latent", "texture"):
        b = ref["blocks"][block]
        assert len(b["mean"]) == len(b["scale"]) == len(b["keep"]) == b["width"] > 0
        assert all(s > 0 for s in b["scale"])
    assert "feature reference of 5 subjects" in log
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("aad-train: error: ")
    return lines[0]


def test_missing_cohorts_is_one_line_and_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    line = _one_error_line(_run(["data=brats", f"hydra.run.dir={run}"]))
    assert "data.cohorts" in line
    assert not run.exists()


def test_bad_cohort_names_the_folder(tmp_path):
    missing = tmp_path / "nope"
    line = _one_error_line(
        _run([f"data.cohorts=[{missing}]", "trainer=cpu", f"hydra.run.dir={tmp_path / 'run'}"])
    )
    assert str(missing) in line


def test_existing_results_are_refused_before_hydra_touches_the_folder(cohort, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"results of last week")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("original: true\n")
    line = _one_error_line(_run([*tiny_overrides(cohort, tmp_path), f"hydra.run.dir={run}"]))
    assert "already holds results" in line and "overwrite=true" in line
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"results of last week"
    assert (run / ".hydra" / "config.yaml").read_text() == "original: true\n"


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_unsafe_resume_checkpoint_is_refused_and_payload_never_runs(cohort, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "aad-med-checkpoint", "p": _Payload(str(marker))}, evil)
    args = tiny_overrides(cohort, tmp_path, **{"trainer.resume": str(evil)})
    line = _one_error_line(_run([*args, f"hydra.run.dir={tmp_path / 'run'}"]))
    assert f"{evil}: not a safe aad-med checkpoint" in line
    assert not marker.exists()


def test_verbose_shows_the_traceback(tmp_path):
    proc = _run(["data=brats", "verbose=true", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# -- crash safety --------------------------------------------------------------------------

KILLER = textwrap.dedent(
    """
    # Runs aad-train and SIGKILLs itself at a chosen point (AAD_TEST_KILL):
    #   step:N          before optimizer step N (mid-epoch)
    #   save:N:partial  during the N-th checkpoint write, half the bytes written
    #   save:N:full     after the N-th checkpoint is written to its temp file, before the rename
    import os, signal, sys
    import torch
    import aad_med.training.loop as loop

    kind, *rest = os.environ["AAD_TEST_KILL"].split(":")
    count = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "step":
        original = loop.Trainer._check_finite

        def check(self, value):
            count["n"] += 1
            if count["n"] == int(rest[0]):
                die()
            return original(self, value)

        loop.Trainer._check_finite = check
    else:
        original_save = torch.save

        def save(obj, f, *a, **k):
            count["n"] += 1
            original_save(obj, f, *a, **k)
            if count["n"] == int(rest[0]):
                if rest[1] == "partial":
                    f.truncate(f.tell() // 2)
                f.flush()
                os.fsync(f.fileno())
                die()

        torch.save = save

    from aad_med.cli.train import main

    sys.exit(main())
    """
)


@pytest.fixture(scope="module")
def crash_setup(tmp_path_factory):
    """One cohort and one uninterrupted reference run shared (read-only) by the kill tests."""
    root = tmp_path_factory.mktemp("crash")
    cohort = write_brats_cohort(root / "cohort", n=5)
    args = tiny_overrides(
        cohort,
        root,
        **{"trainer.max_epochs": 3, "model": "vae", "model.dropout": 0.2, "data.augment": AUGMENT},
    )
    killer = root / "killer.py"
    killer.write_text(KILLER)
    return root, args, killer


@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:4", "save:2:partial", "save:2:full"])
def test_sigkill_then_resume_is_bitwise_equal(crash_setup, point):
    root, args, killer = crash_setup
    reference = root / "reference"
    if not (reference / "checkpoints" / "last.pt").exists():
        proc = _run([*args, f"hydra.run.dir={reference}"])
        assert proc.returncode == 0, proc.stderr
    run = root / point.replace(":", "_")
    env_kill = {**ENV, "AAD_TEST_KILL": point}
    killed = subprocess.run(
        [sys.executable, str(killer), *args, f"hydra.run.dir={run}"],
        capture_output=True,
        text=True,
        env=env_kill,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    last = run / "checkpoints" / "last.pt"
    # Epoch 1 (steps 1-2) was saved; the kill hit epoch 2, or the write of epoch 2's checkpoint.
    assert load_checkpoint(last)["epoch"] == 1, "the checkpoint on disk always loads"
    if point.startswith("save"):
        assert list((run / "checkpoints").glob(".last.pt.tmp-*")), (
            "the torn write stayed a temp file"
        )
    proc = _run([*args, f"hydra.run.dir={run}", f"trainer.resume={last}"])
    assert proc.returncode == 0, proc.stderr
    assert not list((run / "checkpoints").glob(".*.tmp-*"))
    assert load_checkpoint(last)["epoch"] == 3
    assert _equal(_weights(run), _weights(reference))


# -- torchrun ------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_gloo_processes_agree_with_one(cohort, tmp_path):
    # Same global batch (4 patches = 2 subjects x 2); no dropout or VAE sampling, whose random
    # draws are per process by design. Augmentation is seeded per subject, so it agrees.
    args = tiny_overrides(
        cohort,
        tmp_path,
        **{"trainer.max_epochs": 2, "data.augment": AUGMENT, "optim.optimizer.lr": 0.01},
    )
    single = tmp_path / "single"
    proc = _run([*args, f"hydra.run.dir={single}"])
    assert proc.returncode == 0, proc.stderr
    ddp = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "aad_med.cli.train",
            *args,
            "trainer=ddp",
            "trainer.device=cpu",
            f"hydra.run.dir={ddp}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (
        load_checkpoint(single / "checkpoints" / "last.pt"),
        load_checkpoint(ddp / "checkpoints" / "last.pt"),
    )
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert a["step"] == b["step"], "same global batch gives the same number of steps"
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-5)
    # Compare what the models compute, not every parameter: a conv bias in front of instance
    # norm gets a gradient that is pure rounding noise, which Adam rescales to full steps.
    m1, _, _ = load_model_from_checkpoint(single / "checkpoints" / "last.pt")
    m2, _, _ = load_model_from_checkpoint(ddp / "checkpoints" / "last.pt")
    x = torch.randn(6, 4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m2.encode(x), m1.encode(x), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(m2(x), m1(x), rtol=1e-3, atol=1e-4)
    epoch_lines = [ln for ln in (ddp / "train.log").read_text().splitlines() if "train_loss" in ln]
    assert len(epoch_lines) == 2, "rank 0 alone logs"
    assert (ddp / ".hydra" / "config.yaml").read_text() != ""


@pytest.mark.gpu
def test_cuda_training_with_the_cache_on_the_gpu_writes_every_plot(cohort, tmp_path):
    """trainer.cache_on_device keeps the patches on the GPU: the loaders must not pin them and
    the reconstruction figure must copy them back (both crashed before anything ran on CUDA)."""
    run = tmp_path / "run"
    args = tiny_overrides(
        cohort,
        tmp_path,
        **{"trainer": "gpu", "trainer.max_epochs": 1, "trainer.cache_on_device": "true"},
    )
    proc = _run([*args, f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr
    assert (run / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    assert load_checkpoint(run / "checkpoints" / "best.pt")["feature_reference"]["n_subjects"] == 5
