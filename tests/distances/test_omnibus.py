"""The omnibus test: exact p-values from shared label permutations, calibration and power."""

from __future__ import annotations

import numpy as np
import pytest

from aad_med.distances import aad_permutation_test
from aad_med.distances.kernels import (
    energy_from_distances,
    median_heuristic,
    mmd2_from_kernel,
    pairwise_sq_distances,
    rbf_kernel,
)
from aad_med.distances.omnibus import (
    Component,
    combine_pvalues,
    default_components,
    omnibus_permutation_test,
    within_pvalues,
)
from aad_med.distances.permutation import TIE_RTOL, subset_indicators
from aad_med.errors import ConfigError


def _cohorts(rng, n=10, d=6, shift=0.0, scale=1.0):
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) * scale
    b[:, 0] += shift
    return a, b


def _brute_force(components, n_a, n_perm, seed, chunk, combine):
    """Every statistic in float64, straight from its definition, on the same indicators."""
    names = list(components)
    pooled = {k: np.vstack([c.x_a, c.x_b]) for k, c in components.items()}
    n = next(iter(pooled.values())).shape[0]
    rng = np.random.default_rng(seed)
    inds = [np.arange(n) < n_a]
    for block in subset_indicators(n, n_a, n_perm, rng, chunk):
        inds += [col > 0.5 for col in block.T.copy()]
    values = np.zeros((len(names), len(inds)))
    for j, k in enumerate(names):
        z = pooled[k]
        kind = components[k].kind
        d2 = pairwise_sq_distances(z)
        mat = rbf_kernel(d2, median_heuristic(d2)) if kind == "mmd" else np.sqrt(d2)
        for lab, sel in enumerate(inds):
            order = np.concatenate([np.flatnonzero(sel), np.flatnonzero(~sel)])
            if kind == "mean":
                values[j, lab] = np.sum((z[sel].mean(0) - z[~sel].mean(0)) ** 2)
            elif kind == "mmd":
                values[j, lab] = mmd2_from_kernel(mat[np.ix_(order, order)], n_a)
            else:
                values[j, lab] = energy_from_distances(mat[np.ix_(order, order)], n_a)
    lab_n = len(inds)
    p = np.zeros_like(values)
    for j in range(len(names)):
        tol = TIE_RTOL * np.median(np.abs(values[j]))
        for lab in range(lab_n):
            p[j, lab] = np.sum(values[j] >= values[j, lab] - tol) / lab_n
    comb = -p.min(axis=0) if combine == "min_p" else -np.log(p).sum(axis=0)
    k = np.sum(comb[1:] >= comb[0] - 1e-9 * max(1.0, abs(comb[0])))
    return (k + 1) / lab_n, {name: p[j, 0] for j, name in enumerate(names)}


@pytest.mark.parametrize("combine", ["min_p", "fisher"])
def test_equals_brute_force_reference_on_a_tiny_case(combine):
    rng = np.random.default_rng(3)
    a, b = _cohorts(rng, n=5, d=3, shift=0.8)
    fa, fb = _cohorts(rng, n=5, d=2)
    comps = {
        "aad": Component("mean", a, b),
        "fp": Component("mean", fa, fb),
        "mmd": Component("mmd", a, b),
        "energy": Component("energy", fa, fb),
    }
    res = omnibus_permutation_test(comps, n_permutations=150, seed=11, combine=combine, chunk=40)
    p_ref, comp_ref = _brute_force(comps, 5, 150, 11, 40, combine)
    assert res.omnibus_p == pytest.approx(p_ref, abs=1e-12)
    for name, p in comp_ref.items():
        assert res.pvalues[name] == pytest.approx(p, abs=1e-12)
    assert res.driver == min(comp_ref, key=comp_ref.get)


def test_pvalue_is_on_the_permutation_grid_and_never_below_one_over_b_plus_one():
    rng = np.random.default_rng(0)
    a, b = _cohorts(rng, n=12, shift=6.0)  # a huge shift: every component at its floor
    res = omnibus_permutation_test(default_components(a, b), n_permutations=99, seed=0)
    assert res.omnibus_p == pytest.approx(1 / 100)
    assert all(p == pytest.approx(1 / 100) for p in res.pvalues.values())
    for seed in range(5):
        a, b = _cohorts(np.random.default_rng(seed), n=8)
        r = omnibus_permutation_test(default_components(a, b), n_permutations=49, seed=seed)
        assert 1 / 50 <= r.omnibus_p <= 1.0
        assert (r.omnibus_p * 50) == pytest.approx(round(r.omnibus_p * 50))


def test_component_pvalue_matches_the_aad_permutation_test_on_the_same_shuffles():
    rng = np.random.default_rng(5)
    a, b = _cohorts(rng, n=14, d=20, shift=0.9)
    res = omnibus_permutation_test({"aad": Component("mean", a, b)}, n_permutations=999, seed=7)
    ref = aad_permutation_test(a, b, n_permutations=999, seed=7)
    assert res.pvalues["aad"] == pytest.approx(ref.pvalue)
    assert res.statistics["aad"] == pytest.approx(ref.statistic, rel=1e-6)
    # With a single component the combination is the component itself.
    assert res.omnibus_p == pytest.approx(ref.pvalue)


def test_deterministic_per_seed():
    rng = np.random.default_rng(2)
    a, b = _cohorts(rng, n=10, shift=0.5)
    fa, fb = _cohorts(rng, n=10, d=4, scale=1.3)
    comps = default_components(a, b, fa, fb)
    r1 = omnibus_permutation_test(comps, n_permutations=499, seed=4)
    r2 = omnibus_permutation_test(comps, n_permutations=499, seed=4)
    assert r1 == r2
    others = {omnibus_permutation_test(comps, 499, seed=s).omnibus_p for s in range(5, 10)}
    assert len(others | {r1.omnibus_p}) > 1  # another seed draws other shuffles


@pytest.mark.parametrize("combine", ["min_p", "fisher"])
def test_calibrated_over_many_null_splits(combine):
    """Rejection rate at alpha over 300 same-distribution splits, within 2 Monte-Carlo SEs."""
    rng = np.random.default_rng(123)
    alpha, reps = 0.05, 300
    hits = 0
    for r in range(reps):
        # Heavy tails and differing feature matrices per component, as in practice.
        x = rng.standard_t(3, size=(20, 8))
        f = rng.lognormal(size=(20, 5))
        comps = default_components(x[:10], x[10:], f[:10], f[10:])
        res = omnibus_permutation_test(comps, n_permutations=199, seed=r, combine=combine)
        hits += res.omnibus_p <= alpha
    se = np.sqrt(alpha * (1 - alpha) / reps)
    assert hits / reps <= alpha + 2 * se


def test_power_at_least_each_components_over_shifts_they_see_differently():
    """Mean shift (AAD sees), fingerprint shift (only the fingerprint sees), spread change (MMD /
    energy see, the AAD does not): the omnibus detects more often than any single component."""
    rng = np.random.default_rng(9)
    alpha, reps = 0.05, 20
    scenarios = {
        "mean": dict(shift=1.6, scale=1.0, fp_shift=0.0),
        "fingerprint": dict(shift=0.0, scale=1.0, fp_shift=1.6),
        "spread": dict(shift=0.0, scale=2.5, fp_shift=0.0),
    }
    rates = {}
    for name, s in scenarios.items():
        hits: dict[str, int] = {}
        for r in range(reps):
            a, b = _cohorts(rng, n=15, d=4, shift=s["shift"], scale=s["scale"])
            fa, fb = _cohorts(rng, n=15, d=3, shift=s["fp_shift"])
            res = omnibus_permutation_test(default_components(a, b, fa, fb), 199, seed=r)
            for k, p in {"omnibus": res.omnibus_p, **res.pvalues}.items():
                hits[k] = hits.get(k, 0) + (p <= alpha)
        rates[name] = {k: v / reps for k, v in hits.items()}
    overall = {k: np.mean([rates[s][k] for s in scenarios]) for k in rates["mean"]}
    for comp in ("aad", "mmd", "energy", "fingerprint"):
        assert overall["omnibus"] >= overall[comp], (comp, rates)
    # Each scenario is seen by the omnibus nearly as often as by the component that sees it.
    assert rates["mean"]["omnibus"] >= 0.8
    assert rates["fingerprint"]["omnibus"] >= 0.8 and rates["fingerprint"]["aad"] <= 0.3
    assert rates["spread"]["omnibus"] >= 0.8 and rates["spread"]["aad"] <= 0.3


def test_driver_is_the_component_that_sees_the_shift():
    rng = np.random.default_rng(4)
    a, b = _cohorts(rng, n=15, d=4)
    fa, fb = _cohorts(rng, n=15, d=3, shift=3.0)
    res = omnibus_permutation_test(default_components(a, b, fa, fb), 499, seed=0)
    assert res.driver == "fingerprint"
    assert res.omnibus_p < 0.01
    assert res.to_dict()["omnibus_driver"] == "fingerprint"


def test_within_pvalues_and_combination():
    vals = np.array([[3.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    p = within_pvalues(vals)
    np.testing.assert_allclose(p, [[0.5, 1.0, 0.75, 0.5], [1.0, 0.75, 0.5, 0.25]])
    np.testing.assert_allclose(combine_pvalues(p, "min_p"), [-0.5, -0.75, -0.5, -0.25])
    with pytest.raises(ConfigError, match="combination"):
        combine_pvalues(p, "stouffer")


def test_bad_input_is_refused_with_a_clear_message():
    rng = np.random.default_rng(0)
    a, b = _cohorts(rng, n=6)
    with pytest.raises(ConfigError, match="same subjects"):
        omnibus_permutation_test(
            {"x": Component("mean", a, b), "y": Component("mean", a, b[:5])}, 9
        )
    with pytest.raises(ConfigError, match="unknown kind"):
        omnibus_permutation_test({"x": Component("median", a, b)}, 9)
    with pytest.raises(ConfigError, match="at least one component"):
        omnibus_permutation_test({}, 9)
    with pytest.raises(ConfigError, match="n_permutations"):
        omnibus_permutation_test({"x": Component("mean", a, b)}, 0)
    with pytest.raises(ConfigError, match="both cohorts"):
        default_components(a, b, a, None)


def test_pair_seed_follows_names_so_a_pair_keeps_its_p_in_any_call():
    from aad_med.distances import compare_embeddings
    from aad_med.distances.omnibus import pair_seed

    assert pair_seed(0, "x", "y") == pair_seed(0, "x", "y")
    assert pair_seed(0, "x", "y") != pair_seed(0, "y", "x") != pair_seed(1, "x", "y")
    assert pair_seed(0, "x", "y", 1) != pair_seed(0, "x", "y", 2)
    rng = np.random.default_rng(3)
    data = {k: rng.normal(size=(8, 5)) + (0.6 if k == "y" else 0.0) for k in "wxyz"}
    small = compare_embeddings({k: data[k] for k in "xy"}, 199, 50, seed=4)
    large = compare_embeddings(data, 199, 50, seed=4)
    p_small = small["pairs"][0]
    p_large = next(p for p in large["pairs"] if (p["a"], p["b"]) == ("x", "y"))
    for key in ("aad", "aad_p", "mmd_p", "energy_p", "hotelling_p"):
        assert p_small[key] == p_large[key], key
    # A cohort's bootstrap band does not depend on its position either.
    assert small["cohorts"]["x"]["mean_ci95_lo"] == large["cohorts"]["x"]["mean_ci95_lo"]
