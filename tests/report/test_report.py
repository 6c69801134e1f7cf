"""The report writers: strict JSON, CSV, NIfTI and a Markdown/HTML report carrying the numbers,
definitions, the overlap warning and embedded images."""

from __future__ import annotations

import base64
import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest

from aad_med.io_utils import to_jsonable
from aad_med.plots.statistics import plot_pairwise_aad
from aad_med.report.document import write_report
from aad_med.report.serialize import (
    write_distances_json,
    write_matrix_csv,
    write_nifti,
)
from aad_med.report.text import DEFINITIONS, interpretation, overlap_warning


def fake_result(overlap: int = 0) -> dict:
    pair = {
        "a": "siteA",
        "b": "siteB",
        "n_a": 12,
        "n_b": 10,
        "aad": 2.1234,
        "aad2_unbiased": 4.0,
        "aad_ci95": [1.5432, 2.8765],
        "aad_p": 0.000999,
        "aad_p_fdr": 0.001998,
        "n_permutations": 999,
        "aad_null_median": 0.5,
        "aad_null_ratio": 4.2468,
        "aad_standardized": 1.8,
        "hotelling_t2": 30.5,
        "hotelling_p": 0.0021,
        "mmd2": 0.31,
        "mmd_p": 0.004,
        "energy": 0.9,
        "energy_p": 0.003,
        "frechet": 5.5,
        "akld": 0.7,
        "ks_dims_fdr": [0, 3],
        "top_dims": [[0, 0.81], [3, 0.1]],
    }
    null_pair = dict(
        pair,
        b="siteC",
        aad=0.41,
        aad_p=0.62,
        aad_p_fdr=0.62,
        aad_null_ratio=0.95,
        ks_dims_fdr=[],
        top_dims=[[5, 0.3]],
    )
    return {
        "checkpoint": "/ckpt/best.pt",
        "latent_dim": 8,
        "features": "latent",
        "settings": {"n_permutations": 999, "n_bootstrap": 500, "seed": 0},
        "cohorts": {
            "siteA": {"n_subjects": 12, "path": "/data/A", "train_overlap": overlap},
            "siteB": {"n_subjects": 10, "path": "/data/B", "train_overlap": 0},
            "siteC": {"n_subjects": 10, "path": "/data/C", "train_overlap": 0},
        },
        "pairs": [pair, null_pair],
        "definitions": {"mmd2": "Custom definition from distances."},
    }


def test_to_jsonable_converts_numpy_and_nan():
    obj = {
        "a": np.float32(1.5),
        "b": np.arange(3),
        "c": float("nan"),
        "d": (np.int64(2),),
        "e": np.bool_(True),
        "f": [np.inf],
    }
    out = to_jsonable(obj)
    assert out == {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [2], "e": True, "f": [None]}
    json.dumps(out, allow_nan=False)


def test_distances_json_roundtrip(tmp_path):
    res = fake_result()
    res["pairs"][0]["aad_null_ratio"] = np.float64("nan")
    path = write_distances_json(tmp_path / "distances.json", res)
    back = json.loads(path.read_text())
    assert back["pairs"][0]["aad"] == pytest.approx(2.1234)
    assert back["pairs"][0]["aad_null_ratio"] is None
    assert back["cohorts"]["siteA"]["n_subjects"] == 12
    assert not list(tmp_path.glob(".*"))


def test_matrix_csv(tmp_path):
    m = np.array([[0.0, 1.25], [1.25, 0.0]])
    path = write_matrix_csv(tmp_path / "pairwise_aad.csv", ["a", "b"], m)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["cohort", "a", "b"]
    assert rows[1][0] == "a" and float(rows[1][2]) == 1.25


def test_nifti_channel_last(tmp_path):
    d = np.random.default_rng(0).normal(size=(4, 6, 7, 8)).astype(np.float32)
    path = write_nifti(tmp_path / "diff.nii.gz", d)
    img = nib.load(str(path))
    assert img.shape == (6, 7, 8, 4)
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 2], d[2])


def test_interpretation_sentences():
    res = fake_result()
    sig = interpretation(res["pairs"][0])
    assert "2.12" in sig and "differ more than chance" in sig
    ns = interpretation(res["pairs"][1])
    assert "no evidence" in ns and "spread" in ns
    assert interpretation({"interpretation": "Given by distances."}) == "Given by distances."


def test_overlap_warning():
    assert overlap_warning(fake_result()["cohorts"]) is None
    w = overlap_warning(fake_result(overlap=5)["cohorts"])
    assert "5 of 12 subjects of siteA" in w and "over-sensitive" in w


def test_report_contains_numbers_definitions_and_images(tmp_path):
    res = fake_result(overlap=3)
    png = plot_pairwise_aad(
        ["siteA", "siteB"], np.array([[0, 2.1], [2.1, 0]]), tmp_path / "plots" / "pairwise_aad.png"
    )
    md_path, html_path = write_report(res, tmp_path, {"pairwise_aad": png})
    md = md_path.read_text()
    page = html_path.read_text()
    for text in (md, page):
        assert "2.12 [1.54, 2.88]" in text  # AAD [CI]
        assert "9.99e-04" in text and re.search(r"\b0\.002\b", text)  # p and FDR p
        assert "4.25" in text  # null ratio
        assert "1.8" in text  # standardized effect size
        assert "0.31" in text and "5.5" in text  # MMD², Fréchet
        assert "WARNING" in text and "3 of 12 subjects of siteA" in text
        assert "What each number means" in text and "What AAD cannot see" in text
        # Statistic prose comes from report/text.py alone: a copy carried in the result (as
        # distances.compare once overrode it) never reaches the reader.
        assert "Custom definition from distances." not in text
        for key in DEFINITIONS:
            assert key in text
        # The meaning of the bias-corrected aad_standardized reaches the reader (its level with
        # no shift), from report/text.py and not from a copy elsewhere.
        assert "With no shift its median is 0" in text
    assert "](plots/pairwise_aad.png)" in md
    # HTML is self-contained: the image is embedded, no file reference remains.
    m = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert m and base64.b64decode(m.group(1)) == png.read_bytes()
    assert "src='plots/" not in page


def test_report_lists_skipped_subjects(tmp_path):
    res = fake_result()
    res["cohorts"]["siteB"]["skipped"] = ["/data/B/s7: t1 file is truncated"]
    md, _ = write_report(res, tmp_path)
    assert "| siteB | /data/B/s7: t1 file is truncated |" in md.read_text()


def test_report_without_overlap_has_no_warning(tmp_path):
    md, _ = write_report(fake_result(), tmp_path)
    assert "WARNING" not in md.read_text()


def test_report_shows_the_seed_latent_aad_beside_other_features(tmp_path):
    res = fake_result()
    res["features"] = "multiscale+texture"
    res["pairs"][0].update(
        latent_aad=0.4321,
        latent_aad_ci95=[0.301, 0.702],
        latent_aad_p=0.43,
        latent_aad_p_fdr=0.55,
        latent_aad_null_ratio=1.07,
    )
    md, page = write_report(res, tmp_path)
    md = md.read_text()
    assert "| pair | AAD (multiscale+texture) [95% CI] |" in md
    assert "seed's latent AAD [95% CI] | latent AAD p (FDR) | latent × null median |" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| siteA vs siteB |"))
    assert "0.432 [0.301, 0.702]" in row and "0.43 (0.55)" in row and "1.07" in row
    # The pair without a latent AAD shows n/a, not a misleading number.
    row = next(ln for ln in md.splitlines() if ln.startswith("| siteA vs siteC |"))
    assert row.count("n/a") >= 3
    assert "The seed's latent AAD (mean of patch latents) is 0.432" in md
    assert "no evidence that the mean latent vectors differ" in md
    # A latent-only comparison keeps the plain column.
    plain = write_report(fake_result(), tmp_path / "plain")[0].read_text()
    assert "| pair | AAD [95% CI] |" in plain and "seed's latent AAD" not in plain


def test_report_says_what_the_features_can_and_cannot_see(tmp_path):
    from aad_med import DEFAULT_FEATURES

    res = fake_result()
    res["features"] = DEFAULT_FEATURES
    res["pairs"][0].update(intensity_p=0.001, intensity_p_fdr=0.002, intensity_distance=3.0)
    md = write_report(res, tmp_path)[0].read_text()
    assert "## What these features can and cannot see" in md
    assert f"The statistics used the feature set `{DEFAULT_FEATURES}`" in md
    assert "It sees noise, blur, gamma/contrast and population differences" in md
    assert "never a global intensity scale" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| shift between cohorts |"))
    assert header == (
        f"| shift between cohorts | AAD ({DEFAULT_FEATURES}) | seed's latent AAD "
        "| intensity fingerprint |"
    )
    rows = {ln.split(" | ")[0][2:]: ln for ln in md.splitlines() if ln.startswith("| ")}
    # The at-defaults benchmark rows (BENCHMARKS.md): bias 0.25 / 0.00 / 1.00.
    assert rows["smooth bias field (about 7× stronger)"].endswith(
        "| sometimes (25%) | not seen (0%) | seen (100%) |"
    )
    assert rows["contrast (gamma 1.5)"].endswith("| seen (100%) | not seen (0%) | seen (100%) |")
    # The intensity scale was not run at the defaults: said so, not guessed.
    assert rows["global intensity scale (×1.5)"].endswith(
        "| not measured | not measured | not measured |"
    )
    assert "| same-site cohorts flagged (false positives, alpha 0.01) | 1.5% | 1.0% | 0.5% |" in md
    assert "sensitivity benchmark" in md
    # The plain latent comparison says the mean latent is blind to scanner differences.
    plain = write_report(fake_result(), tmp_path / "plain")[0].read_text()
    assert "blind to most scanner and protocol differences" in plain
    # A feature set the benchmark never measured is said to be unknown.
    res["features"] = "mystery"
    md = write_report(res, tmp_path / "other")[0].read_text()
    assert "did not measure: what it can see is unknown" in md and "not measured" in md


def test_every_feature_set_has_benchmark_text():
    from aad_med.embedding import available_feature_sets
    from aad_med.report.text import DETECTION_RATES, SAME_SITE_FPR, features_paragraph

    for name in available_feature_sets():
        assert name in DETECTION_RATES and name in SAME_SITE_FPR, name
        assert "did not measure" not in features_paragraph(name)


def test_benchmark_rates_match_the_measured_table():
    """The report's rates are the benchmark's figures: the at-defaults table (16 per cohort) for
    every set run there, the scaled-down table for the others (BENCHMARKS.md)."""
    from pathlib import Path

    from aad_med.report.text import DETECTION_RATES, FINGERPRINT, SAME_SITE_FPR, SHIFT_KINDS

    root = Path(__file__).resolve().parents[2]
    text = (root / "BENCHMARKS.md").read_text()
    defaults = text.split("## Sensitivity at the defaults", 1)[1].split("### 32 subjects")[0]
    scaled = text.split("## Sensitivity at the defaults", 1)[0]

    def rows(section: str, width: int) -> dict[str, list[str]]:
        table: dict[str, list[str]] = {}
        for line in section.splitlines():
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            if len(cells) != width or not re.fullmatch(r"[0-9.]+", cells[1]):
                continue
            name = re.sub(r"\s*\(.*\)$", "", cells[0].replace("*", "")).strip()
            if name.startswith("omnibus"):
                continue
            table.setdefault(FINGERPRINT if name.startswith(FINGERPRINT) else name, cells[1:])
        return table

    at_defaults = rows(defaults, 7)
    scaled_down = {k: v for k, v in rows(scaled, 8).items() if k not in at_defaults}
    assert set(at_defaults) | set(scaled_down) == set(DETECTION_RATES)
    for name, cells in at_defaults.items():
        got = [float(c) for c in cells[:5]]
        order = ("gamma", "bias", "noise", "blur", "population")
        assert got == [DETECTION_RATES[name][k] for k in order], name
        assert "intensity" not in DETECTION_RATES[name], name
        assert float(cells[5].split()[0]) == SAME_SITE_FPR[name], name
    for name, cells in scaled_down.items():
        rates = [float(c) for c in cells[:6]]
        assert rates == [DETECTION_RATES[name][k] for k in SHIFT_KINDS], name
        assert float(cells[6].split()[0]) == SAME_SITE_FPR[name], name


def test_report_leads_with_the_omnibus_verdict_and_its_driver(tmp_path):
    from aad_med.report.text import DEFINITIONS as defs

    res = fake_result()
    res["pairs"][0].update(
        omnibus_p=0.001,
        omnibus_p_fdr=0.002,
        omnibus_driver="fingerprint",
        omnibus_components={"aad": 0.3, "mmd": 0.2, "energy": 0.25, "fingerprint": 0.001},
    )
    res["pairs"][1].update(
        omnibus_p=0.4,
        omnibus_p_fdr=0.4,
        omnibus_driver="aad",
        omnibus_components={"aad": 0.4, "mmd": 0.5, "energy": 0.6, "fingerprint": 0.7},
    )
    md, page = write_report(res, tmp_path)
    md = md.read_text()
    # The verdict comes before the cohorts table and every per-pair section.
    lead = md.index("## Do the cohorts differ at all?")
    assert lead < md.index("## Cohorts") < md.index("## siteA vs siteB")
    verdicts = [ln for ln in md.splitlines() if "do they differ at all?" in ln]
    assert len(verdicts) == 4  # the lead list and each pair's section
    assert verdicts[0] == (
        "- siteA vs siteB: do they differ at all? **Yes** (omnibus p = 0.001, FDR-adjusted "
        "across 2 pairs 0.002), driven by the intensity fingerprint (raw intensities: gain, "
        "contrast, bias field) (component p-values: aad 0.3, mmd 0.2, energy 0.25, "
        "fingerprint 0.001)."
    )
    assert "siteA vs siteC: do they differ at all? **No evidence** at α = 0.05" in verdicts[1]
    # The AAD stays the distance with its own p-value, after the verdict.
    section = md[md.index("## siteA vs siteB") :]
    assert section.index("do they differ at all?") < section.index("AAD between siteA and siteB")
    assert "<strong>Yes</strong>" in page.read_text()
    for key in ("omnibus_p", "omnibus_p_fdr", "omnibus_driver", "omnibus_components", "scale"):
        assert key in defs
    # The scale the numbers are on is said next to the verdict.
    assert "Feature scale" not in md  # fake_result records none
    res["scale"] = "pooled"
    pooled = write_report(res, tmp_path / "pooled")[0].read_text()
    assert "compare AAD values only within this run" in pooled
    res["scale"] = "checkpoint"
    fixed = write_report(res, tmp_path / "fixed")[0].read_text()
    assert "Feature scale: fixed, from the checkpoint" in fixed
    assert fixed.index("Feature scale") < fixed.index("## Cohorts")
    # Without an omnibus (older results) there is no lead section.
    plain = write_report(fake_result(), tmp_path / "plain")[0].read_text()
    assert "Do the cohorts differ at all?" not in plain
