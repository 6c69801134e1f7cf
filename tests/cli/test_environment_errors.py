"""A hostile environment through the console scripts (issue 13, items 3, 6, 7, 8 and 9): disk
full, read-only or file-shaped run folders, a run folder inside a cohort, an unavailable device,
Ctrl-C, a closed output pipe, a second run into a folder in use, refused or failed runs into a
folder holding another run's results. Each ends with exit code 2 (130 for Ctrl-C), one line, no
traceback, and a results folder exactly as it was (``.hydra/`` included, no new file).

Signals and disk-full are real where that is deterministic: Ctrl-C is a real SIGINT the process
sends itself at a known point (a patched function), disk full is ``ENOSPC`` raised by ``fsync``
in the child, and the closed pipe is a pipe whose reader is closed before the child starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.conftest import CLI_ENV, run_cli
from tests.nifti_factory import write_brats_cohort

FAST = [
    "stats.n_permutations=19",
    "stats.n_bootstrap=10",
    "stats.tests=[aad]",
    "decode_means=false",
    "regional=false",
    "embedding.cache=false",
    "stats.intensity=false",
]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("env_cohorts")
    return {
        "a": write_brats_cohort(root / "a", n=2),
        "b": write_brats_cohort(root / "b", n=2, scale=1.5),
    }


def _args(ckpt: Path, cohorts: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint={ckpt}",
        *(f"cohorts.{k}={v}" for k, v in cohorts.items()),
        f"hydra.run.dir={run}",
        *FAST,
        *extra,
    ]


def _old_results(run: Path) -> dict[str, bytes]:
    """A folder as an earlier comparison left it (its results, Hydra's files, the user's)."""
    files = {
        "distances.json": '{"old": true}\n',
        "report.md": "old report\n",
        "plots/latent_means.png": "old png",
        ".hydra/config.yaml": "old: config\n",
        ".hydra/overrides.yaml": "- old=overrides\n",
        "notes.txt": "the user's own notes\n",
    }
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    return _tree(run)


def _tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def assert_one_line(proc: subprocess.CompletedProcess, prog: str, rc: int = 2) -> str:
    assert proc.returncode == rc, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    lines = [ln for ln in lines if ln.startswith(f"{prog}:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def run_patched(module: str, args: list[str], patch: str) -> subprocess.CompletedProcess:
    """``python -m aad_med.cli.MODULE ARGS`` with ``patch`` (Python) run first in the child."""
    code = textwrap.dedent(patch) + textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["{module}", *{args!r}]
        runpy.run_module("aad_med.cli.{module}", run_name="__main__")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=CLI_ENV
    )


# -- run folder: a file, read-only, inside a cohort --------------------------------------------


def test_run_dir_that_is_a_file(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "results.txt"
    run.write_text("not a folder\n")
    proc = run_cli("compare", _args(tiny_checkpoint, cohorts, run))
    line = assert_one_line(proc, "aad-compare")
    assert line == (
        f"aad-compare: error: {run}: hydra.run.dir is an existing file, not a folder; "
        "choose another hydra.run.dir"
    )
    assert run.read_text() == "not a folder\n" and sorted(tmp_path.iterdir()) == [run]


def test_run_dir_under_a_file(tiny_checkpoint, cohorts, tmp_path):
    (tmp_path / "f").write_text("x")
    proc = run_cli("compare", _args(tiny_checkpoint, cohorts, tmp_path / "f" / "run"))
    line = assert_one_line(proc, "aad-compare")
    assert f"{tmp_path / 'f'}: a folder above hydra.run.dir is an existing file" in line


def test_run_dir_inside_an_input_cohort_is_refused(tiny_checkpoint, tmp_path):
    a = write_brats_cohort(tmp_path / "a", n=2)
    b = write_brats_cohort(tmp_path / "b", n=2)
    before = _tree(a)
    run = a / "results"
    proc = run_cli("compare", _args(tiny_checkpoint, {"a": a, "b": b}, run))
    line = assert_one_line(proc, "aad-compare")
    assert f"{run}: run folder is inside the input cohort {a}" in line
    assert _tree(a) == before and not run.exists()
    # The cohort folder itself as the run folder: refused too, .hydra/ never written there.
    proc = run_cli("compare", _args(tiny_checkpoint, {"a": a, "b": b}, a))
    assert "inside the input cohort" in assert_one_line(proc, "aad-compare")
    assert _tree(a) == before


def _drop_file_permission_override() -> None:
    from tests.cli.test_bad_inputs import _drop_file_permission_override as drop

    drop()


def test_read_only_output_folder(tiny_checkpoint, cohorts, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        cmd = [sys.executable, "-m", "aad_med.cli.compare"]
        cmd += _args(tiny_checkpoint, cohorts, parent / "run")
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=300,
                env=CLI_ENV,
                preexec_fn=_drop_file_permission_override if os.geteuid() == 0 else None,
            )
        except subprocess.TimeoutExpired:
            raise  # a hang is a failure, not a reason to skip
        except subprocess.SubprocessError:
            pytest.skip("root cannot give up its file-permission override here")
        line = assert_one_line(proc, "aad-compare")
        assert line == (
            f"aad-compare: error: {parent}: folder is not writable (read-only?); choose another "
            "hydra.run.dir"
        )
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


# -- disk full, Ctrl-C, broken pipe ------------------------------------------------------------

ENOSPC_PATCH = """
import errno, os
def _full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = _full
"""


def test_disk_full_leaves_old_results_untouched(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    before = _old_results(run)
    proc = run_patched(
        "compare", _args(tiny_checkpoint, cohorts, run, "overwrite=true"), ENOSPC_PATCH
    )
    line = assert_one_line(proc, "aad-compare")
    assert "No space left on device" in line and str(run) in line
    assert _tree(run) == before  # .hydra/ of the old results too, and no new file


def test_ctrl_c_is_one_line_and_130(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    before = _old_results(run)
    patch = """
    import os, signal
    import aad_med.pipelines.compare as cmp
    _real = cmp.load_cohorts
    def _interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return _real(*a, **k)
    cmp.load_cohorts = _interrupted
    """
    proc = run_patched("compare", _args(tiny_checkpoint, cohorts, run, "overwrite=true"), patch)
    assert assert_one_line(proc, "aad-compare", rc=130) == "aad-compare: interrupted"
    assert _tree(run) == before


def test_ctrl_c_in_inspect(cohorts):
    patch = """
    import os, signal
    import aad_med.data.validation as validation
    def _interrupted(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
    validation.load_cohort = _interrupted
    """
    proc = run_patched("inspect", [str(cohorts["a"])], patch)
    assert assert_one_line(proc, "aad-inspect", rc=130) == "aad-inspect: interrupted"
    assert proc.returncode == 128 + signal.SIGINT


def test_broken_pipe_exits_quietly(cohorts):
    """``aad-inspect COHORT | head -0``: the reader is gone before the first line."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "aad_med.cli.inspect", str(cohorts["a"]), str(cohorts["b"])],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=CLI_ENV,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 2
    assert proc.stderr == ""


def test_unwritable_cache_folder_runs_uncached(tiny_checkpoint, cohorts, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be\n")
    run = tmp_path / "run"
    args = [a for a in _args(tiny_checkpoint, cohorts, run) if not a.startswith("embedding.cache")]
    args += [f"embedding.cache_dir={blocker / 'sub'}", "stats.intensity=true"]
    proc = run_cli("compare", args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = [ln for ln in proc.stderr.splitlines() if ln.startswith("aad-compare: warning: ")]
    assert len(warned) == 2, proc.stderr[-2000:]
    assert "cannot write the embedding cache" in warned[0]
    assert "cannot write the intensity cache" in warned[1]
    assert (run / "distances.json").is_file() and "Traceback" not in proc.stderr
    assert blocker.read_text() == "a file where the cache folder should be\n"


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("device=tpu", "aad-compare: error: device must be auto, cpu or cuda, got 'tpu'"),
        (
            "trainer.device=cuda",
            "aad-compare: error: trainer.device=cuda: aad-compare has no trainer; its device "
            "key is device=auto|cpu|cuda (e.g. device=cuda)",
        ),
    ],
)
def test_device_errors(override, expected, tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    proc = run_cli("compare", _args(tiny_checkpoint, cohorts, run, override))
    assert assert_one_line(proc, "aad-compare") == expected
    assert not run.exists()


def test_cuda_on_a_cpu_machine(tiny_checkpoint, cohorts, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    run = tmp_path / "run"
    before = _old_results(run)
    proc = run_cli("compare", _args(tiny_checkpoint, cohorts, run, "device=cuda", "overwrite=true"))
    assert assert_one_line(proc, "aad-compare") == (
        "aad-compare: error: device=cuda but no CUDA GPU is visible; use device=cpu or auto"
    )
    assert _tree(run) == before


# -- provenance of other runs' results ---------------------------------------------------------


def test_failed_overwrite_keeps_hydra_of_the_old_results(tiny_checkpoint, cohorts, tmp_path):
    """overwrite=true with a missing cohort: Hydra started and staged its files, the run
    failed; .hydra/ (and everything else) is the old run's."""
    run = tmp_path / "run"
    before = _old_results(run)
    bad = {**cohorts, "c": tmp_path / "missing"}
    proc = run_cli("compare", _args(tiny_checkpoint, bad, run, "overwrite=true"))
    assert "cohort c" in assert_one_line(proc, "aad-compare")
    assert _tree(run) == before


def test_multirun_into_an_existing_sweep_keeps_its_provenance(tiny_checkpoint, cohorts, tmp_path):
    sweep = tmp_path / "sweep"
    before = _old_results(sweep / "0")
    args = [
        f"checkpoint={tiny_checkpoint}",
        *(f"cohorts.{k}={v}" for k, v in cohorts.items()),
        f"hydra.sweep.dir={sweep}",
        "seed=0",
        *FAST,
        "--multirun",
    ]
    proc = run_cli("compare", args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "already holds results" in proc.stderr and "Traceback" not in proc.stderr
    assert _tree(sweep / "0") == before


def test_successful_run_publishes_its_hydra(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    _old_results(run)
    proc = run_cli("compare", _args(tiny_checkpoint, cohorts, run, "overwrite=true"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    assert "overwrite=true" in overrides and "old=overrides" not in overrides
    assert not list(run.glob(".hydra.*")) and not (run / ".aad-run.lock").exists()
    assert "old" not in json.loads((run / "distances.json").read_text())


# -- concurrent runs ---------------------------------------------------------------------------

HOLD = """
import sys
from aad_med.pipelines.rundir import acquire_run_lock
acquire_run_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_run_into_a_folder_in_use_is_refused(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    before = _old_results(run)
    live_tmp = run / ".aad-compare-0123abcd.tmp"  # the first run's work in progress
    live_tmp.mkdir()
    (live_tmp / "distances.json").write_text("{}")
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        proc = run_cli("compare", _args(tiny_checkpoint, cohorts, run, "overwrite=true"))
        line = assert_one_line(proc, "aad-compare")
        assert line == (
            f"aad-compare: error: {run}: another run (PID {first.pid}) is writing into this "
            "folder; wait for it to finish or choose another hydra.run.dir"
        )
        assert (live_tmp / "distances.json").read_text() == "{}"
    finally:
        first.kill()
        first.wait()
    tree = _tree(run)
    tree.pop(".aad-run.lock")  # the killed holder's file: its lock died with it
    tree.pop(str(live_tmp.relative_to(run) / "distances.json"))
    assert tree == before


# -- never clobber: aad-inspect --json, aad-synth ----------------------------------------------


def test_inspect_json_refuses_a_file_it_did_not_write(cohorts, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"precious")
    proc = run_cli("inspect", [cohorts["a"], "--json", scan])
    assert assert_one_line(proc, "aad-inspect") == (
        f"aad-inspect: error: {scan}: exists and was not written by aad-inspect; choose another "
        "--json path, or pass --force to replace it"
    )
    assert scan.read_bytes() == b"precious"
    out = tmp_path / "fp.json"
    assert run_cli("inspect", [cohorts["a"], "--json", out]).returncode == 0
    # Its own output it replaces; with --force anything.
    assert run_cli("inspect", [cohorts["b"], "--json", out]).returncode == 0
    assert json.loads(out.read_text())["cohorts"][0]["path"] == str(cohorts["b"])
    assert run_cli("inspect", [cohorts["a"], "--json", scan, "--force"]).returncode == 0
    assert json.loads(scan.read_text())["written_by"] == "aad-inspect"


def test_inspect_json_never_writes_into_a_cohort(cohorts):
    target = cohorts["a"] / "fingerprint.json"
    proc = run_cli("inspect", [cohorts["a"], "--json", target, "--force"])
    assert "is inside the input cohort" in assert_one_line(proc, "aad-inspect")
    assert not target.exists()


def _synth(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("synth", [out, "--n-subjects", "1", "--shape", "16", "16", "16", *extra])


def test_synth_refuses_a_folder_of_real_scans(tmp_path):
    out = tmp_path / "real"
    out.mkdir()
    (out / "patient_t1.nii.gz").write_bytes(b"real scan")
    proc = _synth(out)
    line = assert_one_line(proc, "aad-synth")
    assert line.startswith(f"aad-synth: error: {out}: holds files aad-synth did not write")
    assert "--force" in line and sorted(p.name for p in out.iterdir()) == ["patient_t1.nii.gz"]


def test_synth_never_replaces_or_mixes_silently(tmp_path):
    out = tmp_path / "cohort"
    assert _synth(out).returncode == 0
    before = _tree(out)
    proc = _synth(out)  # the same subject again
    assert "already exists (subject BraTS2021_00000)" in assert_one_line(proc, "aad-synth")
    proc = _synth(out, "--site", "site_b", "--start-index", "1")  # another site
    assert "would mix them in one cohort" in assert_one_line(proc, "aad-synth")
    assert _tree(out) == before
    assert _synth(out, "--start-index", "1").returncode == 0  # more subjects of the same site
    assert (out / "BraTS2021_00001").is_dir()
    assert _synth(out, "--site", "site_b", "--force").returncode == 0
    assert (
        _tree(out)["BraTS2021_00000/BraTS2021_00000_t1.nii.gz"]
        != before["BraTS2021_00000/BraTS2021_00000_t1.nii.gz"]
    )


# -- messages ----------------------------------------------------------------------------------


def test_dotted_cohort_name(tiny_checkpoint, cohorts, tmp_path):
    args = _args(tiny_checkpoint, {"a.b": cohorts["a"], "c": cohorts["b"]}, tmp_path / "run")
    proc = run_cli("compare", args)
    assert assert_one_line(proc, "aad-compare") == (
        f"aad-compare: error: cohorts.a.b={cohorts['a']}: cohort name 'a.b' may contain only "
        "letters, digits, '_' and '-' (starting with a letter or digit)"
    )
    assert not (tmp_path / "run").exists()


def test_checkpoint_folder_is_named_as_a_folder(cohorts, tmp_path):
    proc = run_cli("compare", _args(tmp_path, cohorts, tmp_path / "run"))
    assert assert_one_line(proc, "aad-compare") == (
        f"aad-compare: error: {tmp_path}: is a folder, expected a checkpoint file (.pt)"
    )


@pytest.mark.parametrize("name", ["site é", "x,y=[1]", "it's (a)"])
def test_paths_hydra_would_misread_are_accepted(name, tiny_checkpoint, cohorts, tmp_path):
    """Non-ASCII, spaces and ``= , [ ] ( ) '`` in cohort and run-folder paths reach the tool
    as the paths the user typed (quoted for Hydra), not as a lexer error."""
    odd = write_brats_cohort(tmp_path / name / "cohort", n=2, scale=1.5)
    run = tmp_path / name / "run"
    proc = run_cli("compare", _args(tiny_checkpoint, {"a": cohorts["a"], "b": odd}, run))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((run / "distances.json").read_text())
    assert doc["cohorts"]["b"]["path"] == str(odd)
