"""``aad-compare`` never overwrites results silently: a run folder holding results is refused
(before Hydra writes ``.hydra/`` into it, when called as a console script) unless
``overwrite=true``, and then the old results are replaced only once the new ones are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aad_med.errors import ConfigError
from aad_med.pipelines import compare as comparison
from aad_med.pipelines.compare import CompareSettings, run_comparison
from tests.cli.conftest import run_cli
from tests.nifti_factory import write_brats_cohort

FAST = {
    "n_permutations": 49,
    "n_bootstrap": 20,
    "tests": ["aad"],
    "decode_means": False,
    "regional": False,
    "progress": False,
    "cache": False,
    "bands_bootstrap": 20,
}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("overwrite_cohorts")
    return {
        "a": write_brats_cohort(root / "a", n=2),
        "b": write_brats_cohort(root / "b", n=2, scale=1.5),
    }


def _old_results(run: Path) -> dict[str, str]:
    """A run folder as a previous comparison (of other cohorts) and Hydra left it."""
    files = {
        "distances.json": '{"old": true}\n',
        "report.md": "old report\n",
        "plots/latent_means.png": "old png",
        "mean_difference_x_vs_y.png": "old pair of another comparison",
        "encoders/encoder1/distances.json": "{}",
        ".hydra/config.yaml": "old: config\n",
        "compare.log": "old log\n",
        "notes.txt": "the user's own notes\n",
    }
    for rel, text in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    return files


def _tree(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): p.read_bytes().decode("utf-8", "replace")
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


def test_refused_without_overwrite_and_folder_untouched(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _old_results(run)
    before = _tree(run)
    with pytest.raises(ConfigError) as ei:
        run_comparison(tiny_checkpoint, cohorts, run, CompareSettings(**FAST))
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{run}: run folder already holds results (distances.json, ")
    assert "overwrite=true" in msg and "hydra.run.dir" in msg
    assert "trainer.resume" not in msg
    assert _tree(run) == before


@pytest.mark.parametrize("name", ["report.html", "embeddings.csv", "regional_aad.nii.gz"])
def test_any_single_result_file_counts(name, tiny_checkpoint, cohorts, tmp_path):
    (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=f"already holds results \\({name}\\)"):
        run_comparison(tiny_checkpoint, cohorts, tmp_path, CompareSettings(**FAST))


def test_folder_without_results_is_used(tiny_checkpoint, cohorts, tmp_path):
    # What Hydra writes before the comparison starts (.hydra/, compare.log) is not a result.
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "compare.log").write_text("")
    res = run_comparison(tiny_checkpoint, cohorts, run, CompareSettings(**FAST))
    assert (
        json.loads((run / "distances.json").read_text())["pairs"][0]["aad"]
        == res["pairs"][0]["aad"]
    )


def test_overwrite_replaces_old_results_and_keeps_other_files(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _old_results(run)
    res = run_comparison(tiny_checkpoint, cohorts, run, CompareSettings(**FAST, overwrite=True))
    tree = _tree(run)
    assert json.loads(tree["distances.json"])["pairs"][0]["aad"] == res["pairs"][0]["aad"]
    assert tree["report.md"] != "old report\n"
    assert (run / "plots" / "latent_means.png").read_bytes()[:4] == b"\x89PNG"
    # Results of the old comparison that the new one does not produce are gone, not mixed in.
    assert "mean_difference_x_vs_y.png" not in tree
    assert not (run / "encoders").exists()
    # Hydra's files and the user's own are not results: kept as they were.
    assert tree[".hydra/config.yaml"] == "old: config\n"
    assert tree["compare.log"] == "old log\n"
    assert tree["notes.txt"] == "the user's own notes\n"
    assert not [p for p in run.iterdir() if p.name.startswith(".aad-compare")]


def test_overwrite_keeps_old_results_when_the_new_run_fails(
    tiny_checkpoint, cohorts, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    run.mkdir()
    _old_results(run)
    before = _tree(run)

    def fail(*a, **k):
        raise ConfigError("the report could not be written")

    # Fails after the embeddings and figures of the new run were written (to the temp folder).
    monkeypatch.setattr(comparison, "write_report", fail)
    with pytest.raises(ConfigError, match="report could not be written"):
        run_comparison(tiny_checkpoint, cohorts, run, CompareSettings(**FAST, overwrite=True))
    assert _tree(run) == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".hydra"]


def test_console_script_refuses_before_hydra_writes(tiny_checkpoint, cohorts, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _old_results(run)
    before = _tree(run)
    args = [
        f"checkpoint={tiny_checkpoint}",
        f"cohorts.a={cohorts['a']}",
        f"cohorts.b={cohorts['b']}",
        f"hydra.run.dir={run}",
    ]
    proc = run_cli("compare", args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"aad-compare: error: {run}: run folder already holds results (distances.json, "
        "report.md, plots/latent_means.png); replace it with "
        "overwrite=true, or choose another hydra.run.dir"
    ]
    # Not even Hydra's .hydra/ or the log were touched.
    assert _tree(run) == before

    proc = run_cli(
        "compare",
        [
            *args,
            "overwrite=true",
            "stats.n_permutations=49",
            "stats.n_bootstrap=20",
            "stats.tests=[aad]",
            "decode_means=false",
            "regional=false",
            "embedding.cache=false",
        ],
    )
    assert proc.returncode == 0, proc.stderr
    tree = _tree(run)
    assert "old" not in json.loads(tree["distances.json"])
    assert tree["notes.txt"] == "the user's own notes\n"
    assert "mean_difference_x_vs_y.png" not in tree


def test_failed_run_leaves_no_folder_it_created(tmp_path):
    run = tmp_path / "new_run"
    proc = run_cli(
        "compare",
        [
            f"checkpoint={tmp_path / 'missing.pt'}",
            # Not tmp_path itself: a run folder inside an input cohort is refused first.
            f"cohorts.a={tmp_path / 'a'}",
            f"cohorts.b={tmp_path / 'b'}",
            f"hydra.run.dir={run}",
        ],
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"aad-compare: error: {tmp_path / 'missing.pt'}: checkpoint does not exist"
    ]
    assert not run.exists()
