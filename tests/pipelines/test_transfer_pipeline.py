"""The body of aad-transfer (aad_med.pipelines.transfer): the transfer.json contract, the files
beside it, the user's own scores instead of training, bad inputs, and source selection.

(Named ``test_transfer_pipeline.py``: ``tests/distances/test_transfer.py`` exists and the test
folders are not packages, so two files of one name would collide.)"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import transfer_factory
from scipy import stats
from transfer_factory import tiny_settings

from aad_med.data.synthetic import generate_cohort
from aad_med.errors import AADError, InputError
from aad_med.pipelines.performance import read_performance
from aad_med.pipelines.selection import run_selection
from aad_med.pipelines.transfer import (
    DISTANCES,
    SEGMENTER_DISTANCES,
    run_transfer,
    segmenter_distances,
)
from aad_med.report.transfer import LABELS

TARGETS = ("same", "noisy", "blurred")
transfer_data = transfer_factory.transfer_data  # the shared fixture


def _targets(data, names=TARGETS):
    return {n: data[n] for n in names}


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_run(transfer_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_transfer(
        transfer_data["encoder"],
        ("src", transfer_data["source"]),
        _targets(transfer_data),
        out,
        tiny_settings(),
    )
    return out, result


def test_transfer_json_contract(trained_run):
    out, result = trained_run
    on_disk = json.loads((out / "transfer.json").read_text())
    assert on_disk["source"]["name"] == "src"
    src = on_disk["source"]
    assert {"name", "n_train", "n_test", "dice_mean"} <= set(src)
    assert src["n_train"] + src["n_test"] == 6 and src["n_test"] == 2
    assert [t["name"] for t in on_disk["targets"]] == list(TARGETS)
    for t in on_disk["targets"]:
        assert {"name", "n", "dice_mean", "dice_ci95", "dice_drop", "distances"} <= set(t)
        assert t["n"] == 3
        assert t["dice_drop"] == pytest.approx(src["dice_mean"] - t["dice_mean"])
        assert t["dice_ci95"][0] <= t["dice_mean"] <= t["dice_ci95"][1]
        assert t["dice_drop_ci95"][0] <= t["dice_drop"] <= t["dice_drop_ci95"][1]
        assert set(t["distances"]) == set(DISTANCES)
        assert t["distances"]["aad"] > 0 and t["distances"]["latent_aad"] > 0
        # bias-corrected distances: never negative, never above the plain AAD's scale of noise
        for d in ("aad_unbiased", *SEGMENTER_DISTANCES):
            assert t["distances"][d] >= 0, d
        assert t["distances"]["aad_unbiased"] <= t["distances"]["aad"]
    assert set(on_disk["correlations"]) == set(DISTANCES)
    for d, c in on_disk["correlations"].items():
        assert {"spearman", "spearman_ci95", "kendall"} <= set(c)
        x = [t["distances"][d] for t in on_disk["targets"]]
        y = [t["dice_drop"] for t in on_disk["targets"]]
        if d in ("aad_unbiased", *SEGMENTER_DISTANCES) and np.ptp(x) == 0:
            # all three below their noise floor (0): no rank correlation exists
            assert c["spearman"] is None, d
            continue
        assert c["spearman"] is not None, d
        assert c["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)


def test_segmenter_distances_come_from_the_trained_segmenter(trained_run, transfer_data):
    """confidence_aad recomputed from the saved segmenter's own features."""
    from aad_med.data.validation import load_cohort
    from aad_med.segmentation import evaluate_cohort, load_segmenter

    out, result = trained_run
    model, ckpt = load_segmenter(out / "segmenter" / "checkpoints" / "last.pt")
    from aad_med.data.preprocessing import PreprocessingConfig

    prep = PreprocessingConfig.from_dict(ckpt["preprocessing"])
    src = load_cohort(transfer_data["source"])
    test = [r for r in src.subjects if r.subject_id in set(ckpt["test_subject_ids"])]
    ref = evaluate_cohort(model, test, prep, task_features=True).features
    for t in result["targets"]:
        other = evaluate_cohort(
            model, load_cohort(transfer_data[t["name"]]).subjects, prep, task_features=True
        ).features
        assert segmenter_distances(ref, other) == pytest.approx(
            {d: t["distances"][d] for d in SEGMENTER_DISTANCES}
        )
    # a cohort against itself is at distance 0; a missing side gives None
    assert segmenter_distances(ref, ref) == {d: 0.0 for d in SEGMENTER_DISTANCES}
    assert segmenter_distances(ref, None) == {d: None for d in SEGMENTER_DISTANCES}


def test_confidence_distance_grows_with_a_confidence_shift():
    rng = np.random.default_rng(0)
    ref = {"confidence": rng.normal(0.8, 0.02, (20, 3))}
    same = {"confidence": rng.normal(0.8, 0.02, (20, 3))}
    near = {"confidence": rng.normal(0.78, 0.02, (20, 3))}
    far = {"confidence": rng.normal(0.6, 0.02, (20, 3))}
    d = [segmenter_distances(ref, x)["confidence_aad"] for x in (same, near, far)]
    assert d[0] < d[1] < d[2] and d[2] > 2
    # one subject on a side: no bias correction possible, so no distance
    assert segmenter_distances(ref, {"confidence": far["confidence"][:1]}) == {
        "confidence_aad": None
    }


def _write_perf(path, data, source_ids, target_scores):
    from aad_med.data.validation import load_cohort

    lines = ["cohort,subject_id,score"]
    lines += [f"src,{sid},0.9" for sid in source_ids]
    for name, score in target_scores.items():
        for k, sid in enumerate(load_cohort(data[name]).subject_ids):
            lines.append(f"{name},{sid},{score + 0.01 * k}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_own_scores_replace_training(transfer_data, tmp_path):
    from aad_med.data.validation import load_cohort

    ids = load_cohort(transfer_data["source"]).subject_ids
    perf = _write_perf(
        tmp_path / "perf.csv", transfer_data, ids[:4], {"same": 0.88, "noisy": 0.7, "blurred": 0.5}
    )
    out = tmp_path / "run"
    result = run_transfer(
        transfer_data["encoder"], ("src", transfer_data["source"]), _targets(transfer_data), out,
        tiny_settings(performance=str(perf)),
    )  # fmt: skip
    assert not (out / "segmenter").exists()
    assert result["source"]["n_train"] is None and result["source"]["n_test"] == 4
    assert result["source"]["dice_mean"] == pytest.approx(0.9)
    drops = {t["name"]: t["dice_drop"] for t in result["targets"]}
    assert drops == pytest.approx({"same": 0.01, "noisy": 0.19, "blurred": 0.39})
    # each target's distances come from its own pair: dropping a target changes no other's
    alone = run_transfer(
        transfer_data["encoder"], ("src", transfer_data["source"]),
        _targets(transfer_data, ("noisy",)), tmp_path / "alone",
        tiny_settings(performance=str(perf)),
    )  # fmt: skip
    noisy = next(t for t in result["targets"] if t["name"] == "noisy")
    assert alone["targets"][0]["distances"] == pytest.approx(noisy["distances"])
    assert alone["correlations"]["aad"]["spearman"] is None  # one target: no correlation
    # no segmenter trained: its distances are None, left out of the correlations and plots,
    # and empty in the CSV
    for t in result["targets"]:
        assert all(t["distances"][d] is None for d in SEGMENTER_DISTANCES)
    assert not set(SEGMENTER_DISTANCES) & set(result["correlations"])
    assert not any((out / "plots" / f"drop_vs_{d}.png").exists() for d in SEGMENTER_DISTANCES)
    rows = _csv_rows(out / "transfer.csv")
    assert all(r[d] == "" for r in rows for d in SEGMENTER_DISTANCES)
    assert all(float(r["aad"]) > 0 for r in rows)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("cohort,subject,score\n", "header"),
        ("cohort,subject_id,score\nsrc,a,high\n", "line 2: score 'high' is not a number"),
        ("cohort,subject_id,score\nsrc,a,nan\n", "not finite"),
        ("cohort,subject_id,score\nsrc,a,1\nsrc,a,2\n", "line 3: src/a appears twice"),
        ("cohort,subject_id,score\n", "no scores"),
        ("cohort,subject_id,score\nsrc,a\n", "expected 3 columns"),
    ],
)
def test_bad_performance_files(tmp_path, text, problem):
    path = tmp_path / "perf.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as e:
        read_performance(path)
    assert str(path) in str(e.value)


def test_bad_inputs_leave_nothing_behind(transfer_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AADError, match="does not exist"):
        run_transfer(
            transfer_data["encoder"], ("src", transfer_data["source"]),
            {"gone": tmp_path / "missing"}, out, tiny_settings(),
        )  # fmt: skip
    perf = tmp_path / "perf.csv"
    perf.write_text("cohort,subject_id,score\nsrc,nobody,0.5\nsame,x,0.4\n")
    with pytest.raises(InputError, match="nobody"):
        run_transfer(
            transfer_data["encoder"], ("src", transfer_data["source"]),
            _targets(transfer_data, ("same",)), out, tiny_settings(performance=str(perf)),
        )  # fmt: skip
    with pytest.raises(AADError, match="given twice"):
        run_transfer(
            transfer_data["encoder"], ("same", transfer_data["source"]),
            _targets(transfer_data, ("same",)), out, tiny_settings(),
        )  # fmt: skip
    unlabelled = generate_cohort(
        tmp_path / "unlabelled", 2, "noise", 1, (24, 24, 24), with_seg=False
    )
    with pytest.raises(AADError, match="no segmentation .* unlabelled"):
        run_transfer(
            transfer_data["encoder"], ("src", transfer_data["source"]),
            {"unlabelled": unlabelled}, out, tiny_settings(),
        )  # fmt: skip
    assert not out.exists()


def test_source_selection_ranks_and_verifies(transfer_data, tmp_path, monkeypatch):
    import aad_med.embedding.encode as encode

    embedded = []
    real = encode.embed_cohort

    def counting(*args, **kwargs):
        embedded.append(kwargs.get("name"))
        return real(*args, **kwargs)

    monkeypatch.setattr(encode, "embed_cohort", counting)
    sources = {"ref": transfer_data["same"], "blurred": transfer_data["blurred"]}
    run_selection(
        transfer_data["encoder"], ("mine", transfer_data["source"]), sources, tmp_path / "sel",
        tiny_settings(verify=True),
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "sel" / "transfer.json").read_text())
    assert on_disk["mode"] == "selection" and on_disk["target"]["name"] == "mine"
    # the target is embedded once, each source once (as the reference of its pair)
    assert sorted(embedded) == ["mine", "reference", "reference"]
    # 3-subject sources hold out 1 subject each: too few for the segmenter's bias-corrected
    # distances, which are then None and rank nothing
    for r in on_disk["sources"]:
        assert all(r["distances"][d] is None for d in SEGMENTER_DISTANCES)
    assert set(on_disk["rankings"]) == set(on_disk["selection"])
    assert set(on_disk["rankings"]) == set(DISTANCES) - set(SEGMENTER_DISTANCES)
    for d in on_disk["rankings"]:
        ranking = on_disk["rankings"][d]
        dist = {r["name"]: r["distances"][d] for r in on_disk["sources"]}
        assert sorted(ranking) == ["blurred", "ref"]
        assert dist[ranking[0]] <= dist[ranking[1]]
        sel = on_disk["selection"][d]
        achieved = {r["name"]: r["dice_on_target"] for r in on_disk["sources"]}
        assert sel["top1"] == (achieved[ranking[0]] >= max(achieved.values()))
        # a tie within the target subjects' noise is counted apart, never instead of top1
        lo, hi = sel["regret_ci95"]
        assert sel["top1_within_noise"] == (sel["top1"] or lo <= 0 <= hi)
        assert (lo, hi) == (0.0, 0.0) if sel["top1"] else lo <= sel["regret"] <= hi
    md = (tmp_path / "sel" / "transfer.md").read_text()
    for d, sel in on_disk["selection"].items():
        words = (
            "(the best)" if sel["top1"]
            else "a tie within the sampling noise" if sel["top1_within_noise"]
            else "a real loss"
        )  # fmt: skip
        line = next(x for x in md.splitlines() if x.startswith(f"- {LABELS[d]}: picked"))
        assert words in line
    for name in sources:
        assert (
            tmp_path / "sel" / "sources" / name / "segmenter" / "checkpoints" / "last.pt"
        ).exists()


def test_device_errors_name_the_setting(transfer_data, tmp_path):
    import dataclasses

    import torch

    from aad_med.errors import ConfigError

    with pytest.raises(ConfigError, match="segmenter.device must be auto, cpu or cuda"):
        dataclasses.replace(tiny_settings().segmenter, device="gpu")
    if torch.cuda.is_available():
        return
    seg = dataclasses.replace(tiny_settings().segmenter, device="cuda")
    with pytest.raises(ConfigError, match="segmenter.device=cuda but no CUDA GPU"):
        run_transfer(
            transfer_data["encoder"], ("src", transfer_data["source"]),
            _targets(transfer_data), tmp_path / "run", tiny_settings(segmenter=seg),
        )  # fmt: skip
    assert not (tmp_path / "run").exists()
