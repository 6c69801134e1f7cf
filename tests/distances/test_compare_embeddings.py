"""compare_embeddings: the distances.json structure, statistical behaviour and edge cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aad_med.distances import ALL_TESTS, compare_embeddings
from aad_med.distances import compare as compare_module
from aad_med.distances.hotelling import label_free_whitened
from aad_med.distances.univariate import bh_fdr
from aad_med.errors import ConfigError
from aad_med.report.text import interpret_pair

PAIR_KEYS = {
    "a", "b", "n_a", "n_b", "aad", "aad2_unbiased", "aad_ci95", "aad_p", "aad_p_fdr",
    "n_permutations", "aad_null_median", "aad_null_ratio", "aad_standardized", "hotelling_t2",
    "hotelling_p", "hotelling_p_method", "mmd2", "mmd_p", "energy", "energy_p", "frechet",
    "akld", "ks_dims_fdr", "ks_q", "top_dims", "null_aad_sample", "aad_unbiased",
    "aad2_unbiased_se", "aad2_moments", "hotelling_covariance",
}  # fmt: skip


def _sentence(res, pair):
    return interpret_pair(pair, res["alpha"], len(res["pairs"]))


def _cohorts(seed=0, n=12, dim=6, shifts=(0.0, 0.0, 1.2)):
    rng = np.random.default_rng(seed)
    return {f"site{i}": rng.normal(s, 1.0, size=(n + i, dim)) for i, s in enumerate(shifts)}


def _no_nan(obj):
    json.dumps(obj, allow_nan=False)  # raises on NaN/inf
    return True


def test_structure_is_complete_and_json_safe():
    res = compare_embeddings(_cohorts(), n_permutations=499, n_bootstrap=300, seed=1)
    assert _no_nan(res)
    assert set(res["cohorts"]) == {"site0", "site1", "site2"}
    c = res["cohorts"]["site1"]
    assert c["n_subjects"] == 13 and len(c["mean"]) == 6
    assert all(
        lo <= m <= hi
        for lo, m, hi in zip(c["mean_ci95_lo"], c["mean"], c["mean_ci95_hi"], strict=True)
    )
    assert len(res["pairs"]) == 3
    for pair in res["pairs"]:
        assert set(pair) >= PAIR_KEYS
        assert type(pair["aad"]) is float and type(pair["n_a"]) is int
        assert len(pair["top_dims"]) == 6
        assert sum(s for _, s in pair["top_dims"]) == pytest.approx(1.0)
        assert len(pair["ks_q"]) == 6 and len(pair["null_aad_sample"]) == 499
        assert pair["hotelling_p_method"] == "F"
        assert pair["aad_null_ratio"] == pytest.approx(pair["aad"] / pair["aad_null_median"])
        assert pair["aad_unbiased"] == pytest.approx(np.sqrt(max(pair["aad2_unbiased"], 0.0)))
        assert pair["aad_ci95"][0] <= pair["aad_unbiased"] <= pair["aad_ci95"][1]
        # distances returns numbers only; the words live in aad_med.report.text
        assert "interpretation" not in pair and pair["a"] in _sentence(res, pair)
    assert res["tests"] == list(ALL_TESTS)
    assert res["seed"] == 1 and "definitions" not in res


def test_shifted_site_is_significant_and_same_site_is_not():
    res = compare_embeddings(_cohorts(seed=2), n_permutations=999, n_bootstrap=300)
    by_pair = {(p["a"], p["b"]): p for p in res["pairs"]}
    same = by_pair[("site0", "site1")]
    assert same["aad_p_fdr"] > 0.05 and same["aad_null_ratio"] < 1.5
    for key in [("site0", "site2"), ("site1", "site2")]:
        shifted = by_pair[key]
        assert shifted["aad_p_fdr"] < 0.01
        assert shifted["aad_null_ratio"] > 2
        assert shifted["energy_p"] < 0.01 and shifted["mmd_p"] < 0.01
        assert 0 < shifted["aad_ci95"][0] <= shifted["aad_unbiased"] <= shifted["aad_ci95"][1]
        assert shifted["aad_unbiased"] < shifted["aad"]
        assert "the cohort means differ" in _sentence(res, shifted)
    assert same["aad_ci95"][0] == 0.0  # equal means cannot be ruled out


def test_k_cohort_views_fdr_matrix_mds_dendrogram():
    res = compare_embeddings(_cohorts(seed=3), n_permutations=199, n_bootstrap=100, tests=("aad",))
    ps = [p["aad_p"] for p in res["pairs"]]
    assert [p["aad_p_fdr"] for p in res["pairs"]] == pytest.approx(list(bh_fdr(ps)))
    m = np.array(res["pairwise_aad"]["matrix"])
    assert np.allclose(m, m.T) and np.all(np.diag(m) == 0)
    names = res["pairwise_aad"]["names"]
    for p in res["pairs"]:
        assert m[names.index(p["a"]), names.index(p["b"])] == pytest.approx(p["aad"])
    coords = np.array(res["mds"]["coords"])
    recon = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    assert recon == pytest.approx(m, abs=1e-9)  # 3 points embed exactly in the plane
    link = np.array(res["dendrogram"]["linkage"])
    assert link.shape == (2, 4)
    assert set(link[0, :2].astype(int)) == {0, 1}  # the two alike sites merge first


def test_tests_selection_skips_the_kernel_statistics(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("kernel matrices must not be built for tests=('aad',)")

    monkeypatch.setattr(compare_module, "pairwise_sq_distances", forbidden)
    res = compare_embeddings(_cohorts(), n_permutations=199, n_bootstrap=50, tests=("aad",))
    assert res["tests"] == ["aad"]
    for pair in res["pairs"]:
        for key in ("mmd2", "mmd_p", "energy", "energy_p", "frechet", "akld", "ks_q",
                    "hotelling_t2", "hotelling_p", "aad_standardized"):  # fmt: skip
            assert pair[key] is None
        assert pair["aad_p"] is not None and pair["top_dims"]
        assert "run the energy or MMD tests" in _sentence(res, pair)
    monkeypatch.undo()
    partial = compare_embeddings(_cohorts(), 99, 50, tests=("energy", "ks"))
    assert partial["tests"] == ["aad", "energy", "ks"]
    assert partial["pairs"][0]["energy_p"] is not None and partial["pairs"][0]["mmd_p"] is None
    with pytest.raises(ConfigError, match="unknown statistic"):
        compare_embeddings(_cohorts(), 99, 50, tests=("aad", "wasserstein"))


def test_deterministic_for_a_seed():
    emb = _cohorts(seed=4, shifts=(0.0, 0.3))
    r1 = compare_embeddings(emb, 299, 100, seed=7)
    r2 = compare_embeddings(emb, 299, 100, seed=7)
    r3 = compare_embeddings(emb, 299, 100, seed=8)
    assert r1 == r2
    assert r1["pairs"][0]["null_aad_sample"] != r3["pairs"][0]["null_aad_sample"]
    assert r1["pairs"][0]["aad"] == r3["pairs"][0]["aad"]


def test_spread_difference_is_seen_by_energy_not_by_aad():
    rng = np.random.default_rng(5)
    emb = {"narrow": rng.normal(0, 1, size=(40, 3)), "wide": rng.normal(0, 3.5, size=(40, 3))}
    res = compare_embeddings(emb, 999, 200, tests=("energy", "mmd"))
    pair = res["pairs"][0]
    assert pair["aad_p"] > 0.05
    assert pair["energy_p"] < 0.01
    assert "look beyond the means" in _sentence(res, pair)


def test_identical_cohorts_one_dimension_and_constant_dimensions():
    x = np.random.default_rng(6).normal(size=(7, 4))
    pair = compare_embeddings({"a": x, "b": x.copy()}, 199, 50)["pairs"][0]
    assert _no_nan(pair)
    assert pair["aad"] == 0.0 and pair["aad_p"] == 1.0 and pair["aad_null_ratio"] == 0.0
    assert pair["hotelling_p"] == pytest.approx(1.0) and pair["frechet"] == pytest.approx(
        0, abs=1e-9
    )
    assert pair["aad_standardized"] == 0.0

    one_d = compare_embeddings({"a": [1.0, 2.0, 3.0], "b": [2.0, 3.0, 4.5, 5.0]}, 199, 50)
    assert _no_nan(one_d) and one_d["pairs"][0]["aad"] == pytest.approx(1.625)

    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(9, 3)), rng.normal(size=(8, 3))
    a[:, 0] = b[:, 0] = 2.0
    res = compare_embeddings({"a": a, "b": b}, 199, 50)
    assert _no_nan(res) and res["pairs"][0]["ks_q"][0] == 1.0

    flat = compare_embeddings({"a": np.ones((3, 2)), "b": np.ones((4, 2))}, 99, 20)
    flat_pair = flat["pairs"][0]
    assert _no_nan(flat) and flat_pair["aad_p"] == 1.0 and flat_pair["aad_null_ratio"] is None


def test_more_dimensions_than_subjects_uses_permutation_hotelling():
    rng = np.random.default_rng(8)
    emb = {"a": rng.normal(size=(6, 30)), "b": rng.normal(1.0, 1.0, size=(7, 30))}
    pair = compare_embeddings(emb, 499, 100)["pairs"][0]
    assert pair["hotelling_p_method"] == "permutation"
    assert pair["hotelling_covariance"] == "ledoit_wolf_label_free"
    assert pair["hotelling_p"] < 0.05 and pair["aad_p"] < 0.05
    # The reported T² is the statistic the permutation p-value belongs to.
    white = label_free_whitened(np.vstack([emb["a"], emb["b"]]))
    shift = white[:6].mean(axis=0) - white[6:].mean(axis=0)
    assert pair["hotelling_t2"] == pytest.approx(6 * 7 / 13 * shift @ shift, rel=1e-12)
    assert np.isfinite(pair["frechet"]) and pair["frechet"] > 0


def test_bad_inputs_raise_config_errors_naming_the_cohort():
    good = np.zeros((3, 2))
    with pytest.raises(ConfigError, match="cohort 'solo' has 1 subject"):
        compare_embeddings({"a": good, "solo": np.zeros((1, 2))}, 99, 10)
    with pytest.raises(ConfigError, match="at least 2 cohorts"):
        compare_embeddings({"a": good}, 99, 10)
    with pytest.raises(ConfigError, match="different embedding dimensions"):
        compare_embeddings({"a": good, "b": np.zeros((3, 4))}, 99, 10)
    with pytest.raises(ConfigError, match="n_permutations"):
        compare_embeddings({"a": good, "b": good}, 0, 10)
    with pytest.raises(ConfigError, match="seed"):
        compare_embeddings({"a": good, "b": good}, 9, 10, seed=-1)


def test_return_samples_keeps_the_bootstrap_values():
    res = compare_embeddings(_cohorts(shifts=(0, 1)), 99, 250, return_samples=True)
    pair = res["pairs"][0]
    assert len(pair["aad_bootstrap_sample"]) == 250
    # Bootstrap AADs scatter around the biased AAD, not around the bias-corrected one.
    assert np.median(pair["aad_bootstrap_sample"]) > pair["aad_unbiased"]
    assert (
        "aad_bootstrap_sample"
        not in compare_embeddings(_cohorts(shifts=(0, 1)), 99, 50)["pairs"][0]
    )


def test_false_positive_rate_of_the_permutation_tests():
    # 500 null datasets, B = 99: each permutation p-value is uniform on {1/100, ..., 1}, so
    # P(p <= 0.05) is exactly 0.05; the observed rate must be within Monte-Carlo error (sd
    # 0.01). Hotelling is run where it is a permutation test (more dims than subjects); its F
    # version is checked in test_hotelling.py.
    rng = np.random.default_rng(9)
    hits = {"aad_p": 0, "mmd_p": 0, "energy_p": 0, "hotelling_p": 0}
    n_sets = 500
    for i in range(n_sets):
        emb = {"a": rng.normal(size=(4, 7)), "b": rng.normal(size=(5, 7))}
        pair = compare_embeddings(emb, 99, 10, seed=i, tests=("mmd", "energy", "hotelling"))
        assert pair["pairs"][0]["hotelling_p_method"] == "permutation"
        for key in hits:
            hits[key] += pair["pairs"][0][key] <= 0.05
    # The upper side is the guarantee (p <= alpha at most alpha of the time); 4 vs 5 subjects
    # have only 126 labellings, so ties make the test conservative and the lower side is a
    # 3-sd sanity check (the seeds, per pair name since issue 18, decide where in it we land).
    for key, count in hits.items():
        assert 0.02 <= count / n_sets <= 0.07, key
