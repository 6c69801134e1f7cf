"""combine_encoder_runs: combined interval of the distance across encoders and rank stability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aad_med.distances import combine_encoder_runs, compare_embeddings
from aad_med.errors import ConfigError


def _runs(n_encoders=3, shifts=(0.0, 0.4, 0.9, 1.6), seed=0, reverse=False):
    rng = np.random.default_rng(seed)
    base = {f"c{i}": rng.normal(s, 1.0, size=(10, 5)) for i, s in enumerate(shifts)}
    out = []
    for e in range(n_encoders):
        # a different "encoder": an invertible linear map with mild noise per encoder
        w = np.eye(5) + 0.1 * rng.normal(size=(5, 5))
        emb = {k: v @ w for k, v in base.items()}
        if reverse and e == 1:
            emb = {k: -(v @ w) * (1 + 5 * (3 - i)) for i, (k, v) in enumerate(base.items())}
        out.append(compare_embeddings(emb, 99, 200, seed=e, tests=("aad",)))
    return out


def test_combined_interval_covers_the_encoders_unbiased_distances():
    runs = _runs()
    res = combine_encoder_runs(runs)
    json.dumps(res, allow_nan=False)
    assert res["n_encoders"] == 3 and len(res["pairs"]) == 6
    for k, pair in enumerate(res["pairs"]):
        aads = pair["aad_per_encoder"]
        u = np.array([r["pairs"][k]["aad2_unbiased"] for r in runs])
        assert pair["aad_mean"] == pytest.approx(np.mean(aads))
        assert pair["aad_unbiased_mean"] == pytest.approx(np.sqrt(max(u.mean(), 0.0)))
        assert pair["aad_interval_method"] == "unbiased_total_variance"
        lo, hi = pair["aad_interval"]
        unbiased = np.sqrt(np.clip(u, 0.0, None))
        assert 0.0 <= lo <= unbiased.min() <= unbiased.max() <= hi
        assert pair["between_encoder_var"] == pytest.approx(np.var(u, ddof=1))
    # shifts are ordered the same way for every encoder: the pair ranking is stable
    assert res["rank_stability"]["spearman_mean"] > 0.8


def test_identical_runs_reproduce_the_single_run_interval():
    run = _runs(n_encoders=1)[0]
    res = combine_encoder_runs([run, run])
    for pair, orig in zip(res["pairs"], run["pairs"], strict=True):
        assert pair["between_encoder_var"] == 0.0
        assert pair["aad_interval"] == pytest.approx(orig["aad_ci95"], rel=1e-12)
    assert res["rank_stability"]["spearman_mean"] == pytest.approx(1.0)


def test_encoder_disagreement_widens_the_interval():
    runs = _runs(n_encoders=2)
    same = combine_encoder_runs([runs[0], runs[0]])["pairs"][0]["aad_interval"]
    mixed = combine_encoder_runs(runs)["pairs"][0]["aad_interval"]
    assert mixed[1] - mixed[0] > same[1] - same[0]


def test_runs_without_the_moments_fall_back_to_a_t_interval():
    runs = _runs()
    for r in runs:
        for p in r["pairs"]:
            del p["aad2_moments"]
    pair = combine_encoder_runs(runs)["pairs"][0]
    assert pair["aad_interval_method"] == "t_total_variance"
    assert pair["aad_unbiased_mean"] is None
    lo, hi = pair["aad_interval"]
    assert 0.0 <= lo < pair["aad_mean"] < hi


def test_reversed_ordering_lowers_rank_stability():
    res = combine_encoder_runs(_runs(reverse=True))
    rhos = {(i, j): r for i, j, r in res["rank_stability"]["spearman_pairs"]}
    assert rhos[(0, 2)] > 0.8
    assert rhos[(0, 1)] < rhos[(0, 2)]


def test_errors_for_too_few_or_mismatched_results():
    runs = _runs(n_encoders=2)
    with pytest.raises(ConfigError, match="at least 2 encoders"):
        combine_encoder_runs(runs[:1])
    other = compare_embeddings({"x": np.ones((3, 5)), "y": np.zeros((3, 5))}, 9, 10)
    with pytest.raises(ConfigError, match="other cohort pairs"):
        combine_encoder_runs([runs[0], other])
    few = [compare_embeddings({"x": np.eye(3), "y": np.eye(3) + 1}, 9, 10) for _ in range(2)]
    assert combine_encoder_runs(few)["rank_stability"]["spearman_mean"] is None
