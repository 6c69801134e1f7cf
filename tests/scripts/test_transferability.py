"""scripts/transferability.py --quick: 12 targets through aad-transfer's pipeline, and a summary
(JSON, CSV, Markdown) consistent with each run's transfer.json."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "transferability.py"


@pytest.fixture(scope="module")
def transferability():
    spec = importlib.util.spec_from_file_location("transferability_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_covers_the_shift_kinds(transferability):
    kinds = {kind for kind, _, _ in transferability.TARGETS.values()}
    assert kinds == {
        "same site", "noise", "blur", "resolution", "gamma", "bias field", "global scale",
        "tumour size", "brain size",
    }  # fmt: skip
    assert len(transferability.TARGETS) >= 12 and len(transferability.QUICK_TARGETS) >= 12
    assert set(transferability.QUICK_TARGETS) <= set(transferability.TARGETS)


@pytest.mark.slow
def test_quick_mode_writes_a_consistent_summary(transferability, tmp_path):
    out = tmp_path / "bench"
    assert (
        transferability.main(["--quick", "--selection", "--out", str(out), "--threads", "1"]) == 0
    )
    result = json.loads((out / "transferability.json").read_text())
    run = json.loads((out / "seed0" / "transfer.json").read_text())
    assert [t["name"] for t in run["targets"]] == list(transferability.QUICK_TARGETS)
    summary = result["summary"]["distances"]
    for d in ("aad", "latent_aad", "mmd", "energy", "intensity"):
        assert summary[d]["spearman_by_seed"] == [run["correlations"][d]["spearman"]]
    # the segmenter's own distances are computed in every target of a trained run
    for t in run["targets"]:
        assert t["distances"]["confidence_aad"] >= 0
    same = result["summary"]["same_site"]
    assert [x["target"] for x in same] == ["same_site_1"]
    lo, hi = same[0]["dice_drop_ci95"]
    assert same[0]["drop_ci_holds_zero"] == (lo <= 0 <= hi)
    scored = {d: s["spearman_mean"] for d, s in summary.items() if s["spearman_mean"] is not None}
    assert scored
    assert result["summary"]["best"] == max(scored, key=scored.get)
    with open(out / "transferability.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(transferability.QUICK_TARGETS)
    for row, t in zip(rows, run["targets"], strict=True):
        assert float(row["dice_drop"]) == pytest.approx(t["dice_drop"])
    md = (out / "transferability.md").read_text()
    assert "Spearman" in md and "same_site_1" in md and "Source selection" in md
    # source selection: one verdict per target and distance, summarised honestly
    sel = result["selection"]
    assert set(sel["dice"]) == set(transferability.SELECTION_SOURCES)
    for d, per_target in sel["per_target"].items():
        assert set(per_target) == set(transferability.QUICK_TARGETS)
        for t, verdict in per_target.items():
            dice = {src: sel["dice"][src][t] for src in sel["dice"]}
            assert verdict["top1"] == (dice[verdict["ranking"][0]] >= max(dice.values()))
            assert verdict["regret"] == pytest.approx(
                max(dice.values()) - dice[verdict["ranking"][0]]
            )
        rate = sum(v["top1"] for v in per_target.values()) / len(per_target)
        assert sel["summary"][d]["top1_rate"] == pytest.approx(rate)
        # within noise: a hit, or a miss whose paired interval over the subjects holds 0
        for t, verdict in per_target.items():
            lo, hi = verdict["regret_ci95"]
            assert verdict["top1_within_noise"] == (verdict["top1"] or lo <= 0 <= hi)
            scores = {src: sel["dice_subjects"][src][t] for src in sel["dice"]}
            assert all(
                np.mean(list(scores[src].values())) == pytest.approx(sel["dice"][src][t])
                for src in scores
            )
            # the chance level counts the same ties: a pick is within noise iff it is tied
            assert verdict["top1_within_noise"] == (
                verdict["ranking"][0] in sel["chance"]["tied_with_best"][t]
            )
        noise = sum(v["top1_within_noise"] for v in per_target.values()) / len(per_target)
        assert sel["summary"][d]["top1_within_noise_rate"] == pytest.approx(noise)
        assert noise >= rate
    n_src = len(sel["dice"])
    tied = sel["chance"]["tied_with_best"]
    assert sel["chance"]["top1_within_noise_rate"] == pytest.approx(
        np.mean([len(tied[t]) / n_src for t in transferability.QUICK_TARGETS])
    )
    assert "random pick" in md
    with open(out / "transferability_selection.csv", newline="") as f:
        sel_rows = list(csv.DictReader(f))
    assert len(sel_rows) == sum(len(p) for p in sel["per_target"].values())
    for row in sel_rows:
        verdict = sel["per_target"][row["distance"]][row["target"]]
        assert int(row["top1_within_noise"]) == verdict["top1_within_noise"]
    assert "within noise" in md
