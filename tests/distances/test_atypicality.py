"""Per-subject atypicality: exact conformal validity, planted outliers, BH, drivers, bad shapes."""

from __future__ import annotations

import numpy as np
import pytest

from aad_med.distances.atypicality import (
    atypicality,
    bh_qvalues,
    block_contributions,
    conformal_pvalues,
    contributions,
    fit_tail,
    reference_pvalues,
    reference_tail_pvalues,
    scores,
    tail_pvalues,
    tail_sf,
    top_drivers,
)


def _bh_reference(p):
    """Textbook BH (statsmodels' ``fdr_bh`` written out): loop from the largest p-value down."""
    p = list(p)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    q = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        q[i] = running
    return q


def _fpr(method, n_ref, alpha, n_splits, dim, seed, k=3):
    """Fraction of clean test subjects with p <= alpha, one fresh exchangeable draw per split."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_splits):
        x = rng.standard_normal((n_ref + 1, dim)) @ np.diag(np.linspace(0.5, 2.0, dim))
        loo = scores(x[:-1], None, method, k)
        s = scores(x[:-1], x[-1:], method, k)
        hits += conformal_pvalues(s, loo)[0] <= alpha
    return hits / n_splits


@pytest.mark.parametrize("dim", [4, 40])
def test_knn_test_pvalues_are_valid_on_exchangeable_data(dim):
    # n_ref = 19, alpha = 0.1: the full-conformal rate is exactly 2/20 = 0.1, ours is <= that.
    n, alpha = 1500, 0.1
    rate = _fpr("knn", 19, alpha, n, dim, seed=dim)
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / n)
    assert rate > 0.04  # and not vacuous: a rank p-value, not p = 1 everywhere


def test_mahalanobis_test_pvalues_are_close_to_valid():
    n, alpha = 800, 0.1
    rate = _fpr("mahalanobis", 19, alpha, n, 30, seed=7)
    assert rate <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / n)


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_reference_pvalues_are_exact(method):
    # P(p_i <= alpha) = floor(alpha n)/n for a fixed i with continuous scores.
    rng = np.random.default_rng(3)
    n_ref, alpha, reps = 10, 0.2, 800
    hits = 0
    for _ in range(reps):
        x = rng.standard_normal((n_ref, 6))
        hits += reference_pvalues(scores(x, None, method, 3))[0] <= alpha
    sd = np.sqrt(alpha * (1 - alpha) / reps)
    assert abs(hits / reps - alpha) <= 3.5 * sd


def test_conformal_pvalue_formula_and_ties():
    loo = np.array([1.0, 2.0, 2.0, 3.0])
    np.testing.assert_allclose(
        conformal_pvalues([0.5, 2.0, 2.5, 9.0], loo), [5 / 5, 4 / 5, 2 / 5, 1 / 5]
    )
    np.testing.assert_allclose(reference_pvalues(loo), [1.0, 0.75, 0.75, 0.25])


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
@pytest.mark.parametrize("dim", [8, 60])  # 60 > n_ref: shrinkage needed for Mahalanobis
def test_planted_outliers_rank_top(method, dim):
    rng = np.random.default_rng(11)
    ref = rng.standard_normal((30, dim))
    test = rng.standard_normal((20, dim))
    test[[3, 11, 17], : dim // 4] += 4.0
    res = atypicality(ref, {"new": test}, method=method, k=5)
    order = np.argsort(-res["tests"]["new"]["score"])
    assert set(order[:3]) == {3, 11, 17}
    p = res["tests"]["new"]["p"]
    assert np.all(p[[3, 11, 17]] == 1 / 31)  # beyond every LOO score
    # The fitted tail goes below the rank floor 1/(n_ref + 1) for clear outliers.
    assert np.all(res["tests"]["new"]["p_tail"][[3, 11, 17]] < 1 / 31)


def test_reference_outlier_found_by_loo():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((25, 10))
    ref[7] += 6.0
    res = atypicality(ref, method="knn", k=3)
    assert int(np.argmax(res["reference"]["score"])) == 7
    assert res["reference"]["p"][7] == pytest.approx(1 / 25)


def test_bh_matches_reference_implementation():
    rng = np.random.default_rng(2)
    for _ in range(50):
        p = rng.uniform(size=rng.integers(1, 30)) ** 2
        p[rng.integers(p.size)] = p[0]  # a tie
        np.testing.assert_allclose(bh_qvalues(p), _bh_reference(p), rtol=1e-12)
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4p/rank = 0.04, 0.06, 0.0533, 2 -> running minimum from the top
    np.testing.assert_allclose(bh_qvalues([0.01, 0.04, 0.03, 0.5]), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert bh_qvalues([]).size == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bh_qvalues([0.2, 1.5])


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
@pytest.mark.parametrize("dim", [5, 50])
def test_drivers_sum_to_scores_and_point_at_the_shifted_block(method, dim):
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((20, dim))
    test = rng.standard_normal((4, dim))
    test[1, -2:] += 12.0  # 2 x 144 beats 48 noise dims x ~2
    for t in (None, test):
        c = contributions(ref, t, method, 4)
        np.testing.assert_allclose(c.sum(1), scores(ref, t, method, 4), rtol=1e-10)
    c = contributions(ref, test, method, 4)
    blocks = block_contributions(c, {"a": dim - 2, "b": 2})
    np.testing.assert_allclose(blocks["a"] + blocks["b"], c.sum(1))
    assert blocks["b"][1] > blocks["a"][1]
    assert set(top_drivers(c, 2)[1]) == {dim - 2, dim - 1}


def test_knn_score_by_hand():
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    # x = (0, 1): squared distances 1, 2, 1, 41 -> the two nearest give (1 + 1)/2 = 1.
    np.testing.assert_allclose(scores(ref, [[0.0, 1.0]], "knn", 2), [1.0])
    np.testing.assert_allclose(contributions(ref, [[0.0, 1.0]], "knn", 2), [[0.0, 1.0]])
    # LOO of ref[0]: others at squared distances 1, 4, 50 -> k=1 gives 1.
    assert scores(ref, None, "knn", 1)[0] == pytest.approx(1.0)


def test_mahalanobis_matches_dense_formula_when_unshrunk_dims_small():
    from aad_med.distances.covariance import shrunk_covariance

    rng = np.random.default_rng(9)
    ref = rng.standard_normal((40, 3)) @ np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0.3]])
    x = rng.standard_normal((5, 3))
    sigma = shrunk_covariance(ref - ref.mean(0)).matrix()
    d = x - ref.mean(0)
    expected = np.einsum("ij,jk,ik->i", d, np.linalg.inv(sigma), d)
    np.testing.assert_allclose(scores(ref, x, "mahalanobis"), expected, rtol=1e-8)


def test_tail_fits_recover_their_family():
    rng = np.random.default_rng(1)
    g = fit_tail(rng.gamma(4.0, 2.0, size=4000), "gamma")
    assert g["shape"] == pytest.approx(4.0, rel=0.08)
    assert g["scale"] == pytest.approx(2.0, rel=0.08)
    ln = fit_tail(np.exp(rng.normal(1.0, 0.5, size=4000)))
    assert ln["family"] == "lognormal"
    assert ln["log_mean"] == pytest.approx(1.0, abs=0.03)
    assert ln["log_sd"] == pytest.approx(0.5, rel=0.05)
    # Predictive Student-t: P(S > e^(m + 2 sd)) ~ normal tail 0.0228 for large n.
    assert tail_sf(np.exp(1.0 + 2 * 0.5), ln)[0] == pytest.approx(0.0228, abs=0.004)
    with pytest.raises(ValueError, match="positive"):
        fit_tail([0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="equal"):
        fit_tail([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="family"):
        fit_tail([1.0, 2.0, 3.0], "weibull")


@pytest.mark.parametrize("family", ["lognormal", "gamma"])
def test_tail_pvalues_equal_rank_pvalues_up_to_the_largest_loo_score(family):
    rng = np.random.default_rng(8)
    loo = rng.gamma(3.0, 1.0, size=20)
    fit = fit_tail(loo, family)
    inside = np.linspace(0.01, loo.max(), 50)
    np.testing.assert_array_equal(tail_pvalues(inside, loo, fit), conformal_pvalues(inside, loo))
    beyond = loo.max() * np.array([1.0001, 1.5, 3.0, 10.0])
    p = tail_pvalues(beyond, loo, fit)
    assert np.all(np.diff(p) < 0) and p[0] <= 1 / 21 and p[0] > 0.9 / 21 and p[-1] < 1e-3
    ref_p = reference_tail_pvalues(loo, family)
    top = int(np.argmax(loo))
    plain = reference_pvalues(loo)
    np.testing.assert_array_equal(np.delete(ref_p, top), np.delete(plain, top))
    assert ref_p[top] <= plain[top] == 1 / 20


@pytest.mark.parametrize(
    ("ref", "test", "kwargs", "match"),
    [
        (np.zeros(5), None, {}, "2-D"),
        (np.zeros((2, 3)), None, {}, "at least 3"),
        (np.zeros((5, 0)), None, {}, "no feature"),
        (np.ones((5, 3)), np.zeros((2, 4)), {"k": 2}, "4 features"),
        (np.ones((5, 3)), np.zeros((2, 3)), {"k": 5}, r"\[1, 4\]"),
        (np.ones((5, 3)), np.zeros((2, 3)), {"method": "lof"}, "unknown"),
        (np.full((5, 3), np.nan), None, {}, "NaN"),
    ],
)
def test_impossible_shapes_raise(ref, test, kwargs, match):
    with pytest.raises(ValueError, match=match):
        contributions(ref, test, **kwargs)


def test_block_widths_must_match():
    with pytest.raises(ValueError, match="add up"):
        block_contributions(np.zeros((2, 5)), {"a": 2, "b": 2})


def test_result_layout():
    rng = np.random.default_rng(0)
    res = atypicality(rng.standard_normal((12, 4)), {"x": rng.standard_normal((3, 4))}, k=2)
    assert res["n_reference"] == 12 and res["k"] == 2
    assert set(res["tail"]) == {"family", "n", "max", "log_mean", "log_sd"}
    for part in (res["reference"], res["tests"]["x"]):
        assert set(part) == {"score", "p", "q", "contributions", "p_tail", "q_tail"}
        assert np.all(part["q"] >= part["p"])
    no_tail = atypicality(rng.standard_normal((12, 4)), tail=None)
    assert no_tail["tail"] is None and "p_tail" not in no_tail["reference"]
