"""The per-subject step of aad-compare (``aad_med.pipelines.subjects``): the rows of
``subjects.csv`` on arrays (planted outlier first, LOO reference rows, BH within cohorts, drivers
that name the planted block and channel), and end to end on NIfTI cohorts: a subject with T1 and
T2 swapped ranks first with the smallest p, while a clean same-site cohort's p-values are not
small; IQMs are in the table and summarised in the report."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from checkpoint_factory import write_tiny_checkpoint

from aad_med import CHANNELS
from aad_med.data.synthetic import generate_cohort
from aad_med.distances.atypicality import bh_qvalues
from aad_med.errors import ConfigError
from aad_med.pipelines.compare import CompareSettings, run_comparison
from aad_med.pipelines.subjects import (
    SUBJECT_COLUMNS,
    SubjectSettings,
    most_atypical,
    subject_rows,
)

SHAPE = (32, 36, 28)


def _arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(30, 6))
    clean = rng.normal(size=(20, 6))
    bad = rng.normal(size=(10, 6))
    bad[3, 4:] += 8.0  # planted in the second block (columns 4-5)
    fp = {n: rng.normal(size=(len(v), 8)) for n, v in (("ref", ref), ("clean", clean))}
    fp["bad"] = rng.normal(size=(10, 8))
    fp["bad"][3, 6:] += 10.0  # flair block of the fingerprint (2 columns per channel)
    return {"ref": ref, "clean": clean, "bad": bad}, fp


def test_rows_planted_outlier_first_with_drivers():
    vectors, fp = _arrays()
    ids = {n: [f"{n}{i}" for i in range(len(v))] for n, v in vectors.items()}
    columns, rows, info = subject_rows(
        vectors, ids, "ref", [("first", 4), ("second", 2)], fingerprints=fp
    )
    assert columns[: len(SUBJECT_COLUMNS)] == list(SUBJECT_COLUMNS)
    assert [r["cohort"] for r in rows] == ["ref"] * 30 + ["clean"] * 20 + ["bad"] * 10
    assert info == {"method": "knn", "k": 5, "tail": "lognormal", "n_reference": 30}
    bad = [r for r in rows if r["cohort"] == "bad"]
    first = most_atypical(rows, 1)[0]
    assert first["subject_id"] == "bad3"
    assert first["atypicality_p"] == pytest.approx(1 / 31)
    assert first["atypicality_p_tail"] < 1 / 31
    assert first["top_block"] == "second" and first["top_block_share"] > 0.9
    assert first["top_channel"] == "flair" and first["intensity_p"] == pytest.approx(1 / 31)
    assert first["top_dims"].split(";")[0] in ("second[0]", "second[1]")
    # q-values are BH within the subject's own cohort.
    np.testing.assert_allclose(
        [r["atypicality_q"] for r in bad], bh_qvalues([r["atypicality_p"] for r in bad])
    )
    # Reference rows carry leave-one-out p-values: (count of LOO scores >= own) / n_ref.
    ref = [r for r in rows if r["role"] == "reference"]
    scores = np.array([r["atypicality"] for r in ref])
    for r in ref:
        assert r["atypicality_p"] == pytest.approx(np.mean(scores >= r["atypicality"]))


def test_clean_subjects_false_positive_rate_over_references():
    # The guarantee is marginal (over references): one reference can flag 15% of clean
    # subjects (seed 0 of _arrays does), so average over 40 references.
    flagged, medians = [], []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        vectors = {"ref": rng.normal(size=(30, 6)), "clean": rng.normal(size=(50, 6))}
        ids = {n: [f"{n}{i}" for i in range(len(v))] for n, v in vectors.items()}
        _, rows, _ = subject_rows(vectors, ids, "ref", [("all", 6)])
        p = np.array([r["atypicality_p"] for r in rows if r["cohort"] == "clean"])
        flagged.append(np.mean(p <= 0.05))
        medians.append(np.median(p))
    assert np.mean(flagged) <= 0.05 and np.mean(medians) > 0.3


def test_rows_reference_by_name_small_reference_and_errors():
    vectors, _ = _arrays()
    ids = {n: [f"{n}{i}" for i in range(len(v))] for n, v in vectors.items()}
    small = {"clean": vectors["clean"][:3], "ref": vectors["ref"]}
    small_ids = {"clean": ids["clean"][:3], "ref": ids["ref"]}
    _, rows, info = subject_rows(small, small_ids, "clean", [("all", 6)])
    assert info["k"] == 2 and info["n_reference"] == 3  # k reduced to n_ref - 1
    assert {r["role"] for r in rows if r["cohort"] == "clean"} == {"reference"}
    assert all(math.isnan(r["intensity_p"]) for r in rows)
    # Two reference subjects: rows (and IQMs) still written, atypicality cells empty, a note.
    tiny = {"ref": vectors["ref"][:2], "clean": vectors["clean"]}
    tiny_ids = {"ref": ids["ref"][:2], "clean": ids["clean"]}
    _, rows, info = subject_rows(tiny, tiny_ids, "ref", [("all", 6)])
    assert len(rows) == 22 and all(math.isnan(r["atypicality_p"]) for r in rows)
    assert "needs at least 3" in info["note"] and most_atypical(rows) == []
    with pytest.raises(ConfigError, match="reference_cohort='nope'"):
        subject_rows(vectors, ids, "nope", [("all", 6)])
    with pytest.raises(ValueError, match="do not add up"):
        subject_rows(vectors, ids, "ref", [("all", 5)], settings=SubjectSettings())


def _swap_t1_t2(folder: Path, subject_id: str) -> None:
    files = {p.name: p for p in (folder / subject_id).iterdir()}
    t1 = files[f"{subject_id}_t1.nii.gz"]
    t2 = files[f"{subject_id}_t2.nii.gz"]
    tmp = t1.with_name("swap.tmp")
    shutil.move(t1, tmp)
    shutil.move(t2, t1)
    shutil.move(tmp, t2)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("subjects")
    generate_cohort(root / "ref", 12, "reference", seed=3, shape=SHAPE, id_prefix="R_")
    generate_cohort(root / "clean", 8, "reference", seed=4, shape=SHAPE, id_prefix="C_")
    generate_cohort(root / "test", 8, "reference", seed=5, shape=SHAPE, id_prefix="T_")
    _swap_t1_t2(root / "test", "T_00002")
    ckpt = write_tiny_checkpoint(root / "ckpt.pt")
    out = root / "run"
    settings = CompareSettings(
        n_permutations=99, n_bootstrap=50, cache=False, progress=False, regional=False
    )
    result = run_comparison(
        ckpt, {"ref": root / "ref", "clean": root / "clean", "test": root / "test"}, out, settings
    )
    with open(out / "subjects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"out": out, "result": result, "rows": rows}


@pytest.mark.slow
def test_swapped_subject_ranks_first(planted):
    rows = planted["rows"]
    assert len(rows) == 12 + 8 + 8
    assert [r["cohort"] for r in rows].count("ref") == 12
    assert {r["role"] for r in rows if r["cohort"] == "ref"} == {"reference"}
    test = [r for r in rows if r["cohort"] == "test"]
    ranked = sorted(test, key=lambda r: -float(r["atypicality"]))
    assert ranked[0]["subject_id"] == "T_00002"
    p = {r["subject_id"]: float(r["atypicality_p"]) for r in test}
    assert p["T_00002"] == pytest.approx(1 / 13) and p["T_00002"] == min(p.values())
    assert float(ranked[0]["atypicality_p_tail"]) < 1 / 13
    intensity = {r["subject_id"]: float(r["intensity_p"]) for r in test}
    assert intensity["T_00002"] == min(intensity.values())
    assert ranked[0]["top_channel"] in ("t1", "t2")
    # A clean same-site cohort: p-values spread over (0, 1], not piled up near 0.
    clean = [float(r["atypicality_p"]) for r in rows if r["cohort"] == "clean"]
    assert sum(v <= 0.05 for v in clean) <= 1 and np.median(clean) > 0.2


@pytest.mark.slow
def test_quality_columns_report_and_figures(planted):
    out, result, rows = planted["out"], planted["result"], planted["rows"]
    for ch in CHANNELS:
        assert float(rows[0][f"{ch}_snr_wm"]) > 0 and rows[0][f"{ch}_fber"] == ""
    summary = result["subjects"]
    assert summary["reference_cohort"] == "ref" and summary["file"] == "subjects.csv"
    assert summary["most_atypical"][0]["subject_id"] == "T_00002"
    assert summary["counts"]["test"]["n"] == 8
    med, lo, hi = summary["quality"]["clean"]["t1_cnr"]
    assert lo <= med <= hi
    assert (out / summary["quality_png"]).stat().st_size > 1000
    assert (out / summary["most_atypical"][0]["thumbnail"]).is_file()
    report = (out / "report.md").read_text()
    assert "## Which subjects are different" in report and "T_00002" in report
    assert "### Image quality per cohort" in report and "atypicality_p_tail" in report
    assert "drift" not in result  # no stored reference: no drift section


def test_inspect_prints_quality_medians(tmp_path, capsys):
    from aad_med.cli.inspect import main as inspect_main

    generate_cohort(tmp_path / "c", 3, "reference", seed=1, shape=SHAPE, id_prefix="I_")
    assert inspect_main([str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("quality"))
    assert "over 3 subjects" in lines[start]
    assert lines[start + 1].split() == [
        "channel",
        "snr_total",
        "cnr",
        "cjv",
        "efc",
        "inu_range",
        "wm2max",
    ]
    t1 = lines[start + 2].split()
    assert t1[0] == "t1" and all(float(v) > 0 for v in t1[1:])
    # --headers-only reads no voxel: no quality table.
    assert inspect_main([str(tmp_path / "c"), "--headers-only"]) == 0
    assert "image-quality metrics" not in capsys.readouterr().out
