"""``scripts/benchmark.py``: the scipy baseline computes the same statistic as the project's
permutation test, synthetic cohorts of linked subjects are discoverable, and ``--quick --out``
writes ``benchmark.json`` (every section, positive ratios, p-values agreeing within Monte-Carlo
error) and the Markdown table."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("aad_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is created.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_scipy_baseline_tests_the_same_statistic(bench):
    from aad_med.distances.permutation import aad_permutation_test

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((30, 5)), rng.standard_normal((25, 5)) + 0.3
    stat, p = bench.scipy_aad_test(a, b, n_resamples=999, seed=0, batch=200)
    ours = aad_permutation_test(a, b, 999, seed=0)
    assert stat == pytest.approx(np.linalg.norm(a.mean(0) - b.mean(0)), rel=1e-12)
    assert stat == pytest.approx(ours.statistic, rel=1e-12)
    se = math.sqrt(max(p * (1 - p), 1 / 999) / 999)
    assert abs(p - ours.pvalue) <= 4 * math.sqrt(2) * se


def test_make_cohort_links_subjects_under_new_ids(bench, tmp_path):
    from aad_med.data.validation import load_cohort

    root = bench.make_cohort(tmp_path / "c", 5, (24, 28, 20), distinct=2)
    cohort = load_cohort(root)
    assert len(cohort.subjects) == 5
    ids = cohort.subject_ids
    assert len(set(ids)) == 5
    third = cohort.subjects[2]
    assert all(ids[2] in Path(p).name for p in third.files)
    # Subject 2 is subject 0's files under a new name.
    first = {Path(p).name.replace(ids[0], ""): Path(p) for p in cohort.subjects[0].files}
    for p in third.files:
        assert Path(p).read_bytes() == first[Path(p).name.replace(ids[2], "")].read_bytes()


def test_project_defaults_are_read_from_configs(bench):
    d = bench.project_defaults()
    assert d["model"]["patch_size"] == d["data"]["patch_size"]
    assert "_target_" not in d["model"]
    model = bench.build_model(d["model"])
    assert model.patch_size == d["data"]["patch_size"]


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--tmp", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "benchmark.json").read_text())
    assert {"meta", "B1", "B2", "B3", "B4", "B5", "B6", "targets", "markdown"} <= set(res)
    assert res["meta"]["mode"] == "quick"

    b1 = res["B1"]
    for row in ("naive_dataset", "default", "disk_cache"):
        assert b1["rows"][row]["steady_epoch_s"] > 0
        assert b1["rows"][row]["patches_per_epoch"] > 0
    assert b1["ratio_first_epoch"] > 0 and b1["ratio_steady"] > 0

    b2 = res["B2"]
    assert b2["flops_per_step"] > 0 and b2["matmul_flops_per_s"] > 0
    fp32 = b2["variants"]["fp32_eager"]
    assert fp32["status"] == "measured" and 0 < fp32["mfu"] <= 1 and fp32["patches_per_s"] > 0
    if not res["meta"]["cuda"] or "CPU" in res["meta"]["device"]:
        assert b2["variants"]["bf16_cudnn_benchmark"]["status"].startswith("not measured")

    assert res["B3"]["ratio"] > 0
    b4 = res["B4"]
    assert b4["subjects_per_s"] > 0 and b4["decode_share"] > 0
    assert "NormalizeIntensityd" in b4["preprocess_steps_first_subject_s"]
    assert b4["preprocess_monai_chain_s"] > 0 and b4["fused_vs_monai_chain"] > 0

    s = res["B5"]["vs_scipy"]
    assert s["ratio"] > 0
    assert s["statistic_project"] == pytest.approx(s["statistic_scipy"], rel=1e-9)
    assert 0 < s["p_project"] <= 1 and 0 < s["p_scipy"] <= 1
    assert abs(s["p_project"] - s["p_scipy"]) <= 4 * math.sqrt(2) * s["p_mc_se"]
    assert s["p_agree_4se"] is True
    assert res["B5"]["large"]["project_s_one_thread"] > 0
    assert res["B5"]["compare_embeddings"]["seconds"] > 0

    b6 = res["B6"]
    assert [r["subjects"] for r in b6["rows"]] == b6["config"]["sizes"]
    assert b6["ratio_peak"] > 0

    table = (out / "benchmark.md").read_text()
    for section in ("| B1 |", "| B2 |", "| B3 |", "| B4 |", "| B5 |", "| B6 |", "| Target |"):
        assert section in table
    assert table in proc.stdout
