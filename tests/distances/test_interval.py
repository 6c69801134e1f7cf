"""The confidence interval of the cohort distance (aad_ci95): its variance pieces, its basic
properties, its agreement with compare_embeddings and (slow) its coverage."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from aad_med.distances import aad_interval, aad_unbiased, compare_embeddings
from aad_med.distances.aad import aad2_unbiased
from aad_med.distances.interval import DistanceMoments, distance_moments, interval_from_moments

ROOT = Path(__file__).resolve().parents[2]


def _coverage_script():
    spec = importlib.util.spec_from_file_location("coverage_script", ROOT / "scripts/coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variance_pieces_match_the_exact_variance_for_gaussian_and_heavy_tails():
    # Var(U) = V0 + 4 δᵀΣ_Δδ exactly (Chen & Qin 2010); here Σ = I, n 10 and 14, D 6, θ² 0.64.
    v0 = 2 * 6 / (10 * 9) + 2 * 6 / (14 * 13) + 4 * 6 / (10 * 14)
    linear = 4 * 0.64 * (1 / 10 + 1 / 14)
    rng = np.random.default_rng(0)
    for law in ("gaussian", "t3"):
        us, null_hat, lin_hat = [], [], []
        for _ in range(3000):
            if law == "gaussian":
                a, b = rng.normal(size=(10, 6)), rng.normal(size=(14, 6))
            else:  # t(3) scaled to unit variance: plug-in traces of it are very unstable
                a = rng.standard_t(3, size=(10, 6)) / np.sqrt(3)
                b = rng.standard_t(3, size=(14, 6)) / np.sqrt(3)
            a[:, 0] += 0.8
            m = distance_moments(a, b)
            us.append(m.u)
            null_hat.append(m.var_null)
            lin_hat.append(m.var_linear)
        assert np.mean(us) == pytest.approx(0.64, abs=0.03)  # U is unbiased for θ²
        assert np.var(us) == pytest.approx(v0 + linear, rel=0.1), law
        assert np.mean(null_hat) == pytest.approx(v0, rel=0.05), law  # unbiased
        # The linear part is unbiased before it is clipped at 0 (checked: 0.442 vs 0.439 over
        # 6000 t(3) sets); the clip errs on the wide side.
        assert linear <= np.mean(lin_hat) <= 1.5 * linear, law


def test_interval_holds_the_bias_corrected_estimate_and_zero_when_means_are_equal():
    rng = np.random.default_rng(1)
    zero_inside = 0
    for _ in range(200):
        a, b = rng.normal(size=(12, 16)), rng.normal(size=(15, 16))
        lo, hi = aad_interval(a, b)
        assert 0.0 <= lo <= aad_unbiased(a, b) <= hi
        assert aad_unbiased(a, b) == pytest.approx(np.sqrt(max(aad2_unbiased(a, b), 0.0)))
        zero_inside += lo == 0.0
        # the old bootstrap interval sat above the plain AAD; this one never starts above it
        assert lo < np.linalg.norm(a.mean(axis=0) - b.mean(axis=0))
    assert zero_inside >= 190  # about 97.5% expected


def test_bounds_grow_with_the_shift_and_cover_it():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 32)), rng.normal(size=(20, 32))
    direction = a.mean(axis=0) - b.mean(axis=0)
    direction /= np.linalg.norm(direction)
    bounds = np.array([aad_interval(a + t * direction, b) for t in np.linspace(0, 6, 25)])
    assert np.all(np.diff(bounds[:, 0]) >= -1e-12) and np.all(np.diff(bounds[:, 1]) > 0)
    assert bounds[0, 0] == 0.0 and bounds[-1, 0] > 4.0
    # far from 0 the interval is about AAD_unbiased ± 2 standard errors on the distance scale
    shifted = a + 6 * direction
    m = distance_moments(shifted, b)
    lo, hi = aad_interval(shifted, b)
    half = 1.96 * m.se / (2 * np.sqrt(m.u))
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.15)


def test_deterministic_independent_of_seed_and_equal_to_the_vectorised_core():
    rng = np.random.default_rng(3)
    emb = {"a": rng.normal(size=(9, 40)), "b": rng.normal(0.3, 1.0, size=(11, 40))}
    first = compare_embeddings(emb, 99, 50, seed=0, tests=("aad",))["pairs"][0]
    other = compare_embeddings(emb, 99, 50, seed=5, tests=("aad",))["pairs"][0]
    assert first["aad_ci95"] == other["aad_ci95"]
    assert first["aad_ci95"] == list(aad_interval(emb["a"], emb["b"]))
    # many pairs at once (as scripts/coverage.py does) give the same numbers as one at a time
    pairs = [(rng.normal(size=(8, 5)) + s, rng.normal(size=(30, 5))) for s in (0, 0.3, 1, 3)]
    each = [distance_moments(x, y) for x, y in pairs]
    stacked = DistanceMoments(
        **{f.name: np.array([getattr(m, f.name) for m in each]) for f in fields(DistanceMoments)}
    )
    lo, hi = interval_from_moments(stacked)
    for k, (x, y) in enumerate(pairs):
        assert (lo[k], hi[k]) == aad_interval(x, y)


def test_constant_cohorts_have_an_exact_distance():
    lo, hi = aad_interval(np.ones((3, 2)), np.zeros((4, 2)))
    assert lo == hi == pytest.approx(np.sqrt(2))
    assert aad_interval(np.ones((3, 2)), np.ones((4, 2))) == (0.0, 0.0)


def test_coverage_script_quick_cell_and_markdown(tmp_path):
    cov = _coverage_script()
    cell = cov.cell(12, 12, 8, 1.5, "gaussian", reps=60, seed=[0, 1], check_compare=3)
    assert cell["checked_via_compare"] == 3 and cell["reps"] == 60
    assert 0.8 <= cell["coverage"] <= 1.0 and cell["width_ratio"] < 1.6
    zero = cov.cell(12, 12, 8, 0.0, "t3", reps=60, seed=[0, 2])
    info = {"reps": 60, "seconds": 1.0, "summary": cov.summary([cell, zero])}
    text = cov.markdown([cell, zero], info)
    assert "| gaussian | 12 | 12 | 8 |" in text and "Min coverage over θ > 0" in text


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n_a", "n_b", "dim", "multiple", "law"),
    [
        (12, 12, 256, 1.0, "gaussian"),
        (8, 30, 8, 2.5, "t3"),
        (20, 20, 64, 4.0, "t3"),
        (12, 12, 8, 1.5, "gaussian"),
    ],
)
def test_coverage_of_a_few_grid_cells(n_a, n_b, dim, multiple, law):
    # 600 repetitions: Monte-Carlo SE 0.009 at 0.95, so 0.92 is 3 SE below the 0.95 target.
    cell = _coverage_script().cell(n_a, n_b, dim, multiple, law, reps=600, seed=[7, dim])
    assert cell["coverage"] >= 0.92
    assert cell["width_ratio"] <= 1.5
    zero = _coverage_script().cell(n_a, n_b, dim, 0.0, law, reps=600, seed=[8, dim])
    assert zero["contains_zero"] >= 0.95 and zero["lower_le_estimate"] == 1.0
