"""scripts/atypicality.py --quick: planted subjects are written, scored and summarised consistently."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "atypicality.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("atypicality_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_consistent_results(script, tmp_path):
    out = tmp_path / "atyp"
    assert script.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "atypicality.json").read_text())
    assert result["args"]["n_ref"] == [6, 8] and result["k"] == 5
    assert set(result["planted_ids"].values()) == set(script.PLANTS)
    # FPR rows: every space x (2 methods x 4 p-values x 3 alphas + FRD) x n_ref, rates in [0, 1]
    assert len(result["fpr"]) == 2 * 3 * (2 * 4 * 3 + 1)
    assert all(0 <= r["fpr"] <= 1 and r["splits"] == 4 for r in result["fpr"])
    # A rank p-value is at least 1/(n_ref + 1): with n_ref <= 8 nothing reaches 0.05 or below.
    rank = [r for r in result["fpr"] if r["pvalue"] == "rank"]
    assert rank and all(r["fpr"] == 0.0 for r in rank)
    planted = [r for r in result["planted"] if r["method"] != "frd"]
    assert len(planted) == 2 * 3 * 2 * 4
    for r in planted:
        fd = r["first_draw"]
        assert len(fd["planted_ranks"]) == 3 and all(1 <= x <= 8 for x in fd["planted_ranks"])
        floor = 1 / (r["n_ref"] + 1)
        if r["pvalue"] == "rank":
            assert all(floor - 1e-12 <= p <= 1 for p in fd["planted_p"])
        assert 0 <= r["clean_p05"] <= 5 and 0 <= r["planted_p05"] <= 3
    text = (out / "atypicality.md").read_text()
    assert text.startswith("## Atypical subjects") and "FRD rule" in text


def test_planting_swaps_t1_and_t2(script, tmp_path):
    from aad_med.data.synthetic import generate_cohort
    from aad_med.data.validation import load_cohort

    shape = (24, 24, 20)
    folder = generate_cohort(
        tmp_path / "t", n_subjects=2, seed=0, shape=shape, start_index=script.TEST_START
    )
    before = load_cohort(folder).subjects[1]
    t1 = np.asarray(nib.load(before.images["t1"].path).dataobj)
    t2 = np.asarray(nib.load(before.images["t2"].path).dataobj)
    script.plant(folder, {"t1_t2_swap": 1}, 0, shape)
    after = load_cohort(folder).subjects[1]
    assert np.array_equal(np.asarray(nib.load(after.images["t1"].path).dataobj), t2)
    assert np.array_equal(np.asarray(nib.load(after.images["t2"].path).dataobj), t1)
