"""Relating distances to performance drops (aad_med.distances.transfer): rank correlations
against scipy, bootstrap intervals, the isotonic fit against scikit-learn's, the prediction
interval, and source-selection scores (strict and within the subjects' sampling noise)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aad_med.distances.transfer import (
    drop_interval,
    fit_monotone,
    paired_gap_interval,
    rank_correlations,
    rank_sources,
    selection_agreement,
    tied_with_best,
    top1_hit,
    top1_hit_rate,
)
from aad_med.errors import ConfigError


def test_correlations_match_scipy_and_interval_brackets_them():
    rng = np.random.default_rng(0)
    d = rng.uniform(0, 2, 14)
    drop = 0.2 * d + rng.normal(0, 0.08, 14)
    out = rank_correlations(d, drop, n_bootstrap=500, seed=3)
    assert out["n"] == 14
    assert out["spearman"] == pytest.approx(stats.spearmanr(d, drop).statistic)
    assert out["kendall"] == pytest.approx(stats.kendalltau(d, drop).statistic)
    lo, hi = out["spearman_ci95"]
    assert -1 <= lo < out["spearman"] < hi <= 1
    assert out["kendall_ci95"][0] < out["kendall"] < out["kendall_ci95"][1]
    # the same seed gives the same interval, another seed another one
    assert rank_correlations(d, drop, 500, seed=3)["spearman_ci95"] == [lo, hi]
    assert rank_correlations(d, drop, 500, seed=4)["spearman_ci95"] != [lo, hi]


def test_perfectly_ordered_drops_give_one_and_reversed_minus_one():
    d = np.arange(6.0)
    assert rank_correlations(d, d**2, 200)["spearman"] == pytest.approx(1.0)
    assert rank_correlations(d, -d, 200)["kendall"] == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "d, drop",
    [([0.1, 0.2], [0.0, 0.1]), ([1.0, 1.0, 1.0], [0.1, 0.2, 0.3]), ([1, 2, 3], [0.2, 0.2, 0.2])],
    ids=["two_targets", "constant_distance", "constant_drop"],
)
def test_no_correlation_when_undefined(d, drop):
    out = rank_correlations(d, drop, 100)
    assert out["spearman"] is None and out["spearman_ci95"] is None and out["kendall"] is None


@pytest.mark.parametrize(
    "d, drop", [([1, 2, 3], [0.1, 0.2]), ([1, np.nan, 3], [0.1, 0.2, 0.3])], ids=["len", "nan"]
)
def test_bad_inputs_raise(d, drop):
    with pytest.raises(ConfigError):
        rank_correlations(d, drop)
    with pytest.raises(ConfigError):
        fit_monotone(d, drop)


def test_isotonic_fit_matches_scikit_learn():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(1)
    d = rng.uniform(0, 1, 20)
    drop = np.sqrt(d) + rng.normal(0, 0.2, 20)
    fit = fit_monotone(d, drop, n_bootstrap=50)
    ref = IsotonicRegression(out_of_bounds="clip").fit(d, drop)
    np.testing.assert_allclose(fit.predict(d), ref.predict(d), atol=1e-12)
    assert np.all(np.diff(fit.knots_y) >= -1e-12)


def test_fit_pools_violators_and_holds_flat_outside_the_range():
    fit = fit_monotone([1.0, 2.0, 3.0], [0.0, 0.2, 0.1], n_bootstrap=20)
    np.testing.assert_allclose(fit.predict([1.0, 2.0, 3.0]), [0.0, 0.15, 0.15])
    assert fit.predict(-5.0) == pytest.approx(0.0)
    assert fit.predict(50.0) == pytest.approx(0.15)
    assert fit.range == (1.0, 3.0)


def test_tied_distances_are_pooled():
    fit = fit_monotone([1.0, 1.0, 2.0], [0.0, 0.2, 0.3], n_bootstrap=10)
    assert fit.predict(1.0) == pytest.approx(0.1)


def test_prediction_interval_covers_new_cohorts_and_widens_with_scatter():
    rng = np.random.default_rng(2)
    d = np.linspace(0, 1, 30)
    tight = fit_monotone(d, 0.3 * d + rng.normal(0, 0.01, 30), n_bootstrap=300, seed=1)
    loose = fit_monotone(d, 0.3 * d + rng.normal(0, 0.1, 30), n_bootstrap=300, seed=1)
    band_t = tight.interval(0.5)
    band_l = loose.interval(0.5)
    assert band_t[0] < tight.predict(0.5) < band_t[1]
    assert band_l[1] - band_l[0] > 3 * (band_t[1] - band_t[0])
    # new cohorts drawn like the fitted ones fall inside the 95% band about 95% of the time
    x_new = rng.uniform(0.1, 0.9, 400)
    y_new = 0.3 * x_new + rng.normal(0, 0.1, 400)
    band = loose.interval(x_new)
    inside = np.mean((band[:, 0] <= y_new) & (y_new <= band[:, 1]))
    assert 0.85 <= inside <= 0.995
    record = loose.to_dict(grid_points=5)
    assert len(record["grid_distance"]) == 5 and len(record["grid_interval95"]) == 5


def test_source_ranking_and_selection_scores():
    dist = {"a": 0.9, "b": 0.2, "c": 0.5}
    assert rank_sources(dist) == ["b", "c", "a"]
    assert top1_hit(dist, {"a": 0.5, "b": 0.8, "c": 0.7})
    assert not top1_hit(dist, {"a": 0.9, "b": 0.8, "c": 0.7})
    assert top1_hit(dist, {"a": 0.8, "b": 0.8, "c": 0.7})  # a tie for best is a hit
    sel = selection_agreement(dist, {"a": 0.5, "b": 0.8, "c": 0.7})
    assert sel["ranking"] == ["b", "c", "a"] and sel["best"] == "b"
    assert sel["spearman"] == pytest.approx(1.0)
    assert sel["regret"] == 0.0
    miss = selection_agreement(dist, {"a": 0.9, "b": 0.1, "c": 0.5})
    assert miss["spearman"] == pytest.approx(-1.0) and not miss["top1"]
    assert miss["regret"] == pytest.approx(0.8)  # picked b (0.1), a scored 0.9
    assert top1_hit_rate([sel, miss, sel, sel]) == pytest.approx(0.75)
    with pytest.raises(ConfigError):
        top1_hit(dist, {"a": 1.0})
    with pytest.raises(ConfigError):
        top1_hit_rate([])


def test_drop_interval_holds_the_drop_and_zero_only_without_a_loss():
    rng = np.random.default_rng(3)
    src = rng.normal(0.85, 0.05, 16)
    same = rng.normal(0.85, 0.05, 16)
    worse = rng.normal(0.65, 0.05, 16)
    lo, hi = drop_interval(src, same, 2000, seed=0)
    assert lo < src.mean() - same.mean() < hi and lo < 0 < hi
    lo, hi = drop_interval(src, worse, 2000, seed=0)
    assert 0 < lo < src.mean() - worse.mean() < hi
    assert drop_interval(src, worse, 500, seed=1) == drop_interval(src, worse, 500, seed=1)
    # wider with fewer subjects
    lo4, hi4 = drop_interval(src[:4], worse[:4], 2000, seed=0)
    assert hi4 - lo4 > hi - lo
    with pytest.raises(ConfigError):
        drop_interval([], worse)
    with pytest.raises(ConfigError):
        drop_interval(src, [0.5, float("nan")])


def _subjects(values) -> dict[str, float]:
    return {f"s{i:02d}": float(v) for i, v in enumerate(values)}


def test_selection_within_noise_separates_clear_misses_from_ties():
    rng = np.random.default_rng(4)
    base = rng.uniform(0.4, 0.95, 16)  # subjects differ far more than the sources do
    dist = {"a": 0.9, "b": 0.2, "c": 0.5}  # every distance picks b
    # a clear winner (a, +0.10 on every subject) that was not chosen: a real miss
    clear = {"a": base + 0.10, "b": base + rng.normal(0, 0.01, 16), "c": base - 0.2}
    # a and b differ by 0.001 on average but 0.03 per subject: a tie, whoever wins
    tie_diff = rng.normal(0, 0.03, 16)
    tie_diff += 0.001 - tie_diff.mean()
    tie = {"a": base + tie_diff, "b": base, "c": base - 0.2}
    # b chosen and best: a hit
    hit = {"a": base - 0.05, "b": base, "c": base - 0.2}
    verdicts = []
    for per_subject in (clear, tie, hit):
        means = {k: float(v.mean()) for k, v in per_subject.items()}
        subj = {k: _subjects(v) for k, v in per_subject.items()}
        verdicts.append(selection_agreement(dist, means, subj, n_bootstrap=2000, seed=0))
    v_clear, v_tie, v_hit = verdicts
    assert not v_clear["top1"] and not v_clear["top1_within_noise"]
    assert v_clear["best"] == "a" and 0.05 < v_clear["regret_ci95"][0] < v_clear["regret"]
    assert not v_tie["top1"] and v_tie["top1_within_noise"]
    assert v_tie["best"] == "a" and v_tie["regret"] == pytest.approx(0.001)
    assert v_tie["regret_ci95"][0] < 0 < v_tie["regret_ci95"][1]
    assert v_hit["top1"] and v_hit["top1_within_noise"] and v_hit["regret_ci95"] == [0.0, 0.0]
    # the strict rate is the same with or without per-subject scores; within noise adds the tie
    plain = [selection_agreement(dist, {k: float(v.mean()) for k, v in ps.items()})
             for ps in (clear, tie, hit)]  # fmt: skip
    assert "top1_within_noise" not in plain[0]
    assert top1_hit_rate(verdicts) == top1_hit_rate(plain) == pytest.approx(1 / 3)
    assert top1_hit_rate(verdicts, "top1_within_noise") == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="lack"):
        top1_hit_rate(plain, "top1_within_noise")
    # subjects are matched by id, not by position
    shuffled = {k: dict(reversed(list(_subjects(v).items()))) for k, v in clear.items()}
    again = selection_agreement(
        dist, {k: float(v.mean()) for k, v in clear.items()}, shuffled, n_bootstrap=2000, seed=0
    )
    assert again["regret_ci95"] == pytest.approx(v_clear["regret_ci95"])
    with pytest.raises(ConfigError, match="different subjects"):
        selection_agreement(dist, {k: float(v.mean()) for k, v in clear.items()},
                            {**shuffled, "c": _subjects(base[:-1])})  # fmt: skip


def test_tied_with_best_is_the_chance_level_of_a_pick():
    rng = np.random.default_rng(6)
    base = rng.uniform(0.4, 0.95, 16)
    per_subject = {
        "a": base + 0.001 + rng.normal(0, 0.03, 16),  # tied with b
        "b": base,
        "c": base - 0.10,  # clearly worse
    }
    means = {k: float(v.mean()) for k, v in per_subject.items()}
    subj = {k: _subjects(v) for k, v in per_subject.items()}
    best = max(means, key=means.get)
    tied = tied_with_best(means, subj, n_bootstrap=2000, seed=3)
    assert set(tied) == {"a", "b"} and best in tied
    # a distance that picks any source gets "within noise" exactly when that source is tied
    for pick, dist in (("a", {"a": 0, "b": 1, "c": 2}), ("b", {"a": 1, "b": 0, "c": 2}),
                       ("c", {"a": 1, "b": 2, "c": 0})):  # fmt: skip
        v = selection_agreement(dist, means, subj, n_bootstrap=2000, seed=3)
        assert v["ranking"][0] == pick and v["top1_within_noise"] == (pick in tied)
    with pytest.raises(ConfigError):
        tied_with_best(means, {"a": subj["a"], "b": subj["b"]})


def test_paired_gap_interval_uses_the_pairing():
    rng = np.random.default_rng(5)
    best = rng.uniform(0.3, 0.95, 16)
    chosen = best - 0.01 + rng.normal(0, 0.002, 16)  # 0.01 worse on every subject
    lo, hi = paired_gap_interval(best, chosen, 2000, seed=0)
    assert 0 < lo < np.mean(best - chosen) < hi < 0.02
    # unpaired, the subjects' own spread would swamp the 0.01 gap
    assert drop_interval(best, chosen, 2000, seed=0)[0] < 0
    assert paired_gap_interval(best, chosen, 500, seed=1) == paired_gap_interval(
        best, chosen, 500, seed=1
    )
    with pytest.raises(ConfigError):
        paired_gap_interval(best, chosen[:-1])
    with pytest.raises(ConfigError):
        paired_gap_interval([], [])
