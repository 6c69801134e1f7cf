"""The run folder's guards (issue 13, items 5-8): the run lock, the staged ``.hydra/``, refusing
output folders that cannot hold results, quoting paths for Hydra, and the input caveats."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aad_med.cli._runfolder import hydra_quote, input_paths, quote_path_values
from aad_med.errors import ConfigError
from aad_med.pipelines import rundir
from aad_med.pipelines.caveats import input_caveats, smallest_p
from aad_med.pipelines.rundir import (
    LOCK_NAME,
    acquire_run_lock,
    check_output_folder,
    finish_hydra_subdir,
    run_lock,
)

HOLD = """
import sys
from aad_med.pipelines.rundir import acquire_run_lock
acquire_run_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(ConfigError, match=rf"another run \(PID {holder.pid}\) is writing"):
            acquire_run_lock(run)
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left its lock file; the kernel released the lock with the process.
    assert (run / LOCK_NAME).read_text().strip() == str(holder.pid)
    with run_lock(run):
        assert (run / LOCK_NAME).read_text().strip() == str(os.getpid())
        with run_lock(run):  # re-entrant: the CLI and run_comparison both take it
            pass
        assert (run / LOCK_NAME).exists()
    assert not (run / LOCK_NAME).exists()
    assert rundir._HELD == {}


def test_lock_is_only_taken_by_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path):
        assert not (tmp_path / LOCK_NAME).exists()


def _hydra_files(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "overrides.yaml").write_text(text)
    return folder


def test_staged_hydra_is_published_only_with_results(tmp_path):
    run = tmp_path / "run"
    _hydra_files(run / ".hydra", "- old\n")
    staged = _hydra_files(run / f".hydra.pending-{os.getpid()}", "- new\n")
    finish_hydra_subdir(run, staged, wrote_results=False)
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- old\n" and not staged.exists()
    staged = _hydra_files(run / f".hydra.pending-{os.getpid()}", "- new\n")
    finish_hydra_subdir(run, staged, wrote_results=True)
    assert (run / ".hydra" / "overrides.yaml").read_text() == "- new\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra"]


def test_staging_folders_of_dead_processes_are_cleared(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    gone = _hydra_files(run / f".hydra.pending-{int(dead.stdout)}", "x")
    live = _hydra_files(run / f".hydra.pending-{os.getppid()}", "x")
    finish_hydra_subdir(run, None, wrote_results=False)
    assert not gone.exists() and live.exists()


def test_output_folder_checks(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="hydra.run.dir is an existing file"):
        check_output_folder(afile)
    with pytest.raises(ConfigError, match="a folder above hydra.run.dir is an existing file"):
        check_output_folder(afile / "sub" / "run")
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    with pytest.raises(ConfigError, match="inside the input cohort"):
        check_output_folder(cohort / "out", [cohort])
    link = tmp_path / "link"
    link.symlink_to(cohort)
    with pytest.raises(ConfigError, match="inside the input cohort"):
        check_output_folder(link / "out", [cohort])
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id\n")
    check_output_folder(tmp_path / "out", [cohort / "missing", manifest])


def test_input_paths_from_the_command_line():
    argv = ["++cohorts.a=/x", "reference='/r s'", "data.cohorts=[/p,'/q']", "seed=1"]
    assert input_paths(argv) == ["/x", "/r s", "/p", "/q"]


@pytest.mark.parametrize(
    "value",
    [
        "/plain",
        "/site é/ü",
        "/x,y=[1]",
        "/a b",
        "it's",
        "/tail\\",
        "a\\'b",
        "(x){y}",
        '/"q"',
        "a#b&c;d|e*?!^<>",
    ],
)
def test_hydra_quoting_round_trips(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (arg,) = quote_path_values([f"++cohorts.c={value}"])
    override = OverridesParser.create().parse_override(arg)
    assert override.value() == value
    assert OverridesParser.create().parse_override(f"x={hydra_quote(value)}").value() == value


def test_quoting_leaves_lists_interpolations_and_sweeps():
    argv = ["checkpoint=[a.pt,b.pt]", "cohorts.a=${paths.x}/a b", "seed=1,2", "cohorts.b=/x"]
    assert quote_path_values(argv) == argv
    assert quote_path_values(["cohorts.b=/p,q", "-m"]) == ["cohorts.b=/p,q", "-m"]


def test_smallest_attainable_p():
    from aad_med.calibration.curves import smallest_attainable_p

    assert all(smallest_p(n, n, 10**9) == smallest_attainable_p(n) for n in range(2, 12))
    assert smallest_p(2, 2, 999) == pytest.approx(2 / 6)
    assert smallest_p(5, 5, 199) == pytest.approx(2 / math.comb(10, 5))
    assert smallest_p(3, 4, 999) == pytest.approx(1 / 35)
    assert smallest_p(30, 30, 999) == pytest.approx(1 / 1000)


def test_input_caveats(tmp_path):
    from aad_med.data.records import Cohort

    a = tmp_path / "a"
    a.mkdir()
    (tmp_path / "alias").symlink_to(a)
    ck = tmp_path / "m.pt"
    ck.write_bytes(b"weights")
    (tmp_path / "copy.pt").write_bytes(b"weights")

    def cohort(n):
        return Cohort(a, "brats2021", [object()] * n)

    out = input_caveats(
        {"x": a, "y": tmp_path / "alias"},
        {"x": cohort(2), "y": cohort(8)},
        [ck, ck, tmp_path / "copy.pt"],
        n_permutations=999,
    )
    assert len(out) == 4, out
    assert out[0].startswith("cohorts x and y are the same folder")
    assert out[1] == (
        f"checkpoint {ck} is given twice: the encoder-to-encoder spread of the combined "
        "interval is underestimated"
    )
    assert out[2].startswith(f"checkpoint {tmp_path / 'copy.pt'} is a copy of {ck}")
    assert "x (2) subject(s), fewer than 5" in out[3]
    assert f"{1 / math.comb(10, 2):.3g}" in out[3]
    assert input_caveats({"x": a}, {"x": cohort(5)}, [ck], 999) == []
