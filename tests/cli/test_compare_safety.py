"""Safety of ``aad-compare`` and of checkpoint loading everywhere: a pickle payload in the
checkpoint given to ``aad-compare`` is refused and never runs; a comparison killed with SIGKILL
while writing leaves no result in its run folder and the next run there succeeds; and every
load of a file that could hold pickled objects in ``aad_med/`` and ``scripts/`` is the safe kind.
"""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import aad_med
from aad_med.pipelines.compare import RESULT_PATTERNS
from aad_med.pipelines.rundir import existing_results
from tests.cli.conftest import CLI_ENV, run_cli
from tests.nifti_factory import write_brats_cohort

REPO = Path(aad_med.__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the payload ever runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety_cohorts")
    return {
        "a": write_brats_cohort(root / "a", n=2),
        "b": write_brats_cohort(root / "b", n=2, scale=1.5),
    }


def _args(checkpoint: Path, cohorts: dict[str, Path], out: Path) -> list[str]:
    return [
        f"checkpoint={checkpoint}",
        *(f"cohorts.{k}={v}" for k, v in cohorts.items()),
        "stats.n_permutations=49",
        "stats.n_bootstrap=20",
        "stats.bands_bootstrap=20",
        "stats.tests=[aad]",
        "embedding.cache=false",
        f"hydra.run.dir={out}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["payload_only", "inside_valid_checkpoint"])
def test_pickle_payload_checkpoint_is_refused_and_never_runs(
    where, tiny_checkpoint, cohorts, tmp_path
):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    if where == "payload_only":
        torch.save({"format": "aad-med-checkpoint", "p": _Payload(str(marker))}, evil)
    else:
        # Everything a real checkpoint holds, plus one pickled object among the primitives.
        state = torch.load(tiny_checkpoint, weights_only=True)
        state["preprocessing"]["extra"] = {"hook": _Payload(str(marker))}
        torch.save(state, evil)
    out = tmp_path / "out"
    proc = run_cli("compare", _args(evil, cohorts, out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"aad-compare: error: {evil}: not a safe aad-med checkpoint"), line
    assert not marker.exists(), "the pickle payload ran"
    assert not out.exists()


KILLER = textwrap.dedent(
    """
    # aad-compare that SIGKILLs itself once distances.json, the embeddings and the figures are
    # written to its temporary folder, before the report and the move into the run folder.
    import os, signal, sys
    import aad_med.pipelines.compare as comparison

    def write_report(result, out_dir, images=None):
        os.kill(os.getpid(), signal.SIGKILL)

    comparison.write_report = write_report
    from aad_med.cli.compare import main

    main()
    """
)


@pytest.mark.slow
def test_sigkill_while_writing_leaves_no_results_and_the_next_run_succeeds(
    tiny_checkpoint, cohorts, tmp_path
):
    out = tmp_path / "run"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = subprocess.run(
        [sys.executable, str(killer), *_args(tiny_checkpoint, cohorts, out)],
        capture_output=True,
        text=True,
        env=CLI_ENV,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    # The half-written set stayed in the hidden temporary folder; no result is in the run folder.
    (tmp,) = out.glob(".aad-compare-*.tmp")
    assert (tmp / "distances.json").is_file() and (tmp / "embeddings.csv").is_file()
    assert existing_results(out, RESULT_PATTERNS) == []

    # The folder holds no results, so a new run there is not refused; it clears the leftover.
    proc = run_cli("compare", _args(tiny_checkpoint, cohorts, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(out.glob(".aad-compare-*"))
    doc = json.loads((out / "distances.json").read_text())
    assert doc["pairs"][0]["n_permutations"] == 49
    assert (out / "report.md").is_file() and (out / "embeddings.csv").is_file()


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    """Calls to ``x.name(...)`` (``torch.load``, ``np.load``, ...) or ``name(...)``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == name) or (
                isinstance(f, ast.Name) and f.id == name
            ):
                out.append(node)
    return out


def _keyword(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "missing"


def unsafe_loads(source: str, where: str) -> tuple[int, list[str]]:
    """``(number of torch.load calls, problems)`` of one Python source."""
    tree = ast.parse(source)
    torch_loads, unsafe = 0, []
    for call in _calls(tree, "load") + _calls(tree, "loads"):
        f = call.func
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        name = f"{owner}.{f.attr}" if owner else ""
        at = f"{where}:{call.lineno}"
        if name == "torch.load":
            torch_loads += 1
            if _keyword(call, "weights_only") is not True:
                unsafe.append(f"{at}: torch.load without weights_only=True")
        elif name == "np.load" and _keyword(call, "allow_pickle") is True:
            unsafe.append(f"{at}: np.load(allow_pickle=True)")
        elif owner in ("pickle", "dill", "joblib", "cloudpickle"):
            unsafe.append(f"{at}: {name}")
    for call in _calls(tree, "PersistentSubjectDataset") + _calls(tree, "PersistentDataset"):
        # MONAI's disk cache reads its .pt files back with torch.load.
        if _keyword(call, "weights_only") is not True:
            unsafe.append(f"{where}:{call.lineno}: disk cache without weights_only=True")
    return torch_loads, unsafe


def test_the_scan_sees_unsafe_loads():
    bad = textwrap.dedent(
        """
        import pickle, torch, numpy as np
        torch.load(p)
        torch.load(p, weights_only=False)
        np.load(p, allow_pickle=True)
        pickle.loads(b)
        PersistentDataset(data, t, cache_dir=d)
        torch.load(p, map_location="cpu", weights_only=True)
        np.load(p)
        """
    )
    n, problems = unsafe_loads(bad, "x.py")
    assert n == 3
    assert [p.split(": ", 1)[1] for p in problems] == [
        "torch.load without weights_only=True",
        "torch.load without weights_only=True",
        "np.load(allow_pickle=True)",
        "pickle.loads",
        "disk cache without weights_only=True",
    ]


def test_every_load_in_the_code_refuses_pickles():
    sources = sorted((REPO / "aad_med").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
    assert len(sources) > 30
    torch_loads, unsafe = 0, []
    for path in sources:
        n, problems = unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
        torch_loads += n
        unsafe += problems
    assert torch_loads >= 1, "the checkpoint loader itself was found"
    assert unsafe == []
