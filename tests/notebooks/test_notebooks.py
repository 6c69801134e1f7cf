"""Every notebook in notebooks/ runs end to end on small synthetic data (nbclient), and is stored
without outputs (so diffs stay readable and nothing stale ships)."""

from __future__ import annotations

from pathlib import Path

import pytest

# A dev extra: without it (a GPU machine running `pytest -m gpu` with its own packages) the module
# is skipped with this reason instead of failing the whole collection.
nbformat = pytest.importorskip("nbformat", reason="nbformat (the dev extra) is not installed")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_explore_cohorts", "02_train_and_inspect", "03_compare_cohorts", "04_shift_calibration"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} is stored with outputs; clear them before committing"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("AAD_MED_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("AAD_MED_NOTEBOOK_SUBJECTS", "6")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    # each notebook leaves what it made in its work folder
    assert any((tmp_path / "work").iterdir())
