"""scripts/peers.py --quick: every method's rows, thresholds calibrated on the same-site pairs,
peers that do not import skipped with the reason, and the FRD shortcut equal to the package's."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "peers.py"
PEER_MODULES = {
    "frd-score": ("frd_score", "frd_score.frd", "radiomics"),
    "alibi-detect": ("alibi_detect", "alibi_detect.cd"),
    "torchdrift": ("torchdrift", "torchdrift.detectors"),
}
OURS = ("aad_default", "aad_latent")


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def no_peers(peers, tmp_path_factory):
    """A quick run in which no peer imports (as in CI without the extra)."""
    out = tmp_path_factory.mktemp("peers_absent")
    with pytest.MonkeyPatch.context() as mp:
        for modules in PEER_MODULES.values():
            for name in modules:
                mp.setitem(sys.modules, name, None)  # `import name` raises ImportError
        assert peers.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    return out


def check_calibration(result: dict, method: str) -> None:
    """The threshold, FPR and detection rates follow from the recorded per-pair scores."""
    null = next(r for r in result["same_site"] if r["method"] == method)
    scores = result["scores"][method]
    same = np.asarray(scores["same_site"], dtype=float)
    assert len(same) == result["null_repeats"] == 20
    cal, held = same[: null["calibration_pairs"]], same[null["calibration_pairs"] :]
    assert len(cal) == len(held) == null["heldout_pairs"] == 10
    # At most floor(fpr * 10) = 0 calibration pairs above it: the largest calibration score.
    t = null["threshold"]
    assert t == pytest.approx(cal.max())
    assert null["fpr_calibration"] == 0.0 == np.mean(cal > t)
    assert null["fpr_heldout"] == pytest.approx(np.mean(held > t))
    for r in (r for r in result["results"] if r["method"] == method):
        s = np.asarray(scores[r["shift"]], dtype=float)
        assert len(s) == r["repeats"] == 4
        assert r["detection_rate"] == pytest.approx(np.mean(s > t))
        assert 0.0 <= r["detection_rate"] <= 1.0


def test_threshold_allows_at_most_the_target_share_of_same_site_pairs(peers):
    scores = np.arange(100.0)
    t = peers.threshold(scores, 0.05)
    assert t == 94.0 and np.sum(scores > t) == 5
    assert np.sum(np.ones(100) > peers.threshold(np.ones(100), 0.05)) == 0  # ties: none above
    assert peers.threshold([3.0, 1.0, 2.0], 0.0) == 3.0


def test_frechet_shortcut_equals_the_matrix_square_root(peers):
    # More features than subjects, as with radiomics: the covariances are singular.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(9, 40)), rng.normal(0.3, 1.5, size=(11, 40))
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    ref = diff @ diff + np.trace(c1) + np.trace(c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real)
    assert peers.frechet_squared(a, b) == pytest.approx(ref, rel=1e-6)
    assert peers.frechet_squared(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frd_matches_frd_score(peers):
    frd = pytest.importorskip("frd_score.frd", reason="frd-score not installed (peers extra)")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(8, 30)), rng.normal(0.5, 1.0, size=(8, 30))
    za, zb = peers.frd_normalised(a, b)
    d2 = frd.calculate_frechet_distance(
        za.mean(0), np.cov(za, rowvar=False), zb.mean(0), np.cov(zb, rowvar=False)
    )
    assert peers.frechet_squared(za, zb) == pytest.approx(d2, rel=1e-6)
    # Two modalities: the squared distances add before the log.
    score, p = peers.frd_test(np.hstack([a, a]), np.hstack([b, b]), 0, channels=2)
    assert p is None and score == pytest.approx(math.log(2 * d2), rel=1e-6)


def test_quick_run_without_peers_skips_them_with_the_reason(no_peers):
    result = json.loads((no_peers / "peers.json").read_text())
    status = {m["method"]: m for m in result["methods"]}
    assert list(status) == [
        "aad_default", "aad_latent", "frd", "alibi_features", "alibi_images",
        "torchdrift_features", "torchdrift_images",
    ]  # fmt: skip
    for key in OURS:
        assert status[key]["status"] == "ran" and status[key]["reason"] is None
    for key, package in [("frd", "frd-score"), ("alibi_features", "alibi-detect"),
                         ("torchdrift_images", "torchdrift")]:  # fmt: skip
        assert status[key]["status"] == "skipped"
        assert f"{package} not importable" in status[key]["reason"]
        assert "aad-med[peers]" in status[key]["reason"]
    # Rows only for the methods that ran: one per shift, and one same-site row each.
    assert {(r["method"], r["shift"]) for r in result["results"]} == {
        (m, s) for m in OURS for s in ("noise", "population")
    }
    assert [r["method"] for r in result["same_site"]] == list(OURS)
    assert [t["method"] for t in result["timing"]] == list(OURS)
    for key in OURS:
        check_calibration(result, key)
    for t in result["timing"]:
        assert t["extract_s_per_subject"] > 0 and t["test_s_per_pair"] > 0
        assert t["s_per_subject"] == pytest.approx(
            t["extract_s_per_subject"] + t["test_s_per_pair"] / (2 * result["subjects"])
        )
    # Both of ours have p-values: nominal rates are recorded and are shares of 4 pairs.
    for r in result["results"]:
        assert r["nominal_rate"] in {i / 4 for i in range(5)}
    assert result["verdicts"]["peers_ran"] == []
    assert result["verdicts"]["frd_over_default_time"] is None
    assert result["fpr_target"] == 0.05 and result["feature_reference"]["n_subjects"] == 6


def test_quick_run_files_agree(no_peers):
    result = json.loads((no_peers / "peers.json").read_text())
    with open(no_peers / "peers.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    skipped = {r["method"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {m["method"] for m in result["methods"] if m["status"] == "skipped"}
    assert all(reason for reason in skipped.values())
    rates = {(r["method"], r["shift"]): float(r["detection_rate"])
             for r in rows if r["status"] == "ran" and r["shift"] != "same_site"}  # fmt: skip
    assert rates == {(r["method"], r["shift"]): r["detection_rate"] for r in result["results"]}
    held = {r["method"]: float(r["fpr_heldout"]) for r in rows if r["shift"] == "same_site"}
    assert held == {r["method"]: r["fpr_heldout"] for r in result["same_site"]}
    md = (no_peers / "peers.md").read_text()
    assert md.startswith("## Peers\n")
    assert "| aad-med default (omnibus verdict) |" in md and "| latent AAD (seed) |" in md
    assert md.count("**skipped**") == 5
    assert "No peer ran here" in md


@pytest.mark.slow  # ~25 s with all three peers on a shared core (FRD extracts ~0.5 s per image)
def test_quick_run_with_the_installed_peers(peers, tmp_path):
    installed = [p for p in PEER_MODULES if peers.peer_missing(p) is None]
    if not installed:
        pytest.skip("no peer installed (pip install 'aad-med[peers]'; README 'Peers side by side')")
    out = tmp_path / "peers"
    assert peers.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "peers.json").read_text())
    status = {m["method"]: m["status"] for m in result["methods"]}
    by_package = {"frd-score": ["frd"], "alibi-detect": ["alibi_features", "alibi_images"],
                  "torchdrift": ["torchdrift_features", "torchdrift_images"]}  # fmt: skip
    for package, keys in by_package.items():
        for key in keys:
            assert status[key] == ("ran" if package in installed else "skipped")
    for key, st in status.items():
        if st == "ran":
            check_calibration(result, key)
            rows = [r for r in result["results"] if r["method"] == key]
            assert {r["shift"] for r in rows} == {"noise", "population"}
            # FRD has no p-value; the MMD tests and ours do.
            assert all((r["nominal_rate"] is None) == (key == "frd") for r in rows)
    if "frd-score" in installed:
        assert result["frd_channels"] == ["t1"]
        assert result["verdicts"]["frd_over_default_time"] > 0
    md = (out / "peers.md").read_text()
    assert md.count("**skipped**") == sum(st == "skipped" for st in status.values())


def test_full_mode_needs_a_checkpoint(peers, capsys):
    with pytest.raises(SystemExit):
        peers.parse(["--out", "x"])
    assert "--checkpoint is required" in capsys.readouterr().err


def test_markdown_flags_a_held_out_fpr_above_the_target(peers, no_peers):
    result = json.loads((no_peers / "peers.json").read_text())
    for row in result["same_site"]:
        # 10 held-out pairs at 0.05: two binomial SEs above the target is 0.19.
        row["fpr_heldout"] = 0.5 if row["method"] == "aad_latent" else 0.1
    rows = [line for line in peers.markdown(result).splitlines() if "(above target)" in line]
    assert len(rows) == 1 and rows[0].startswith("| latent AAD (seed) |")


def test_all_severities_add_the_milder_pools_after_the_target_ones(peers):
    target = peers.shift_cases(["noise", "population"], False)
    both = peers.shift_cases(["noise", "population"], True)
    # The target pools keep their case names and pool numbers (their data and caches are reused).
    assert both[: len(target)] == target
    assert [(c, k) for c, *_, k in target] == [("noise", 1), ("population", 2)]
    milder = both[len(target) :]
    assert [(kind, k) for _, kind, *_, k in milder] == [("noise", 3), ("population", 4)]
    for case, kind, label, changes, _ in milder:
        assert case == f"{kind}@{label}" and (label, changes) == peers.sens.SHIFTS[kind][0]


def test_a_quick_all_severities_run_scores_every_case(peers, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        for modules in PEER_MODULES.values():
            for name in modules:
                mp.setitem(sys.modules, name, None)
        args = ["--quick", "--all-severities", "--out", str(tmp_path), "--threads", "1"]
        assert peers.main(args) == 0
    result = json.loads((tmp_path / "peers.json").read_text())
    cases = {r["shift"] for r in result["results"] if r["method"] == "aad_default"}
    assert cases == {c for c, *_ in peers.shift_cases(["noise", "population"], True)}
    for r in result["results"]:
        assert r["shift"] in result["scores"][r["method"]]
    assert "noise (noise 6%)" in (tmp_path / "peers.md").read_text()
