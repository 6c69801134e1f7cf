"""aad-compare's omnibus verdict and fixed feature scale (issue 18) through the compare API:
the same pair gives the same AAD and p-values in a 2-cohort and a 7-cohort call, distances.json
carries the omnibus keys and the scale, and the omnibus step is calibrated over same-site
splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aad_med.data.synthetic import SITES, generate_cohort
from aad_med.pipelines.compare import CompareSettings, run_comparison
from aad_med.pipelines.omnibus_step import OMNIBUS_KEYS, add_omnibus
from tests.checkpoint_factory import train_tiny_checkpoint

SHAPE = (32, 36, 28)
SHIFTED = SITES["site_b"].with_updates(name="shifted", brain_size=0.8, scale=(1, 1, 1, 1.6))
OTHERS = {
    # five more cohorts for the 7-cohort call: other sites, other seeds
    "c": ("reference", 21),
    "d": ("site_b", 22),
    "e": (SHIFTED, 23),
    "f": ("reference", 24),
    "g": ("site_b", 25),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from aad_med.data.preprocessing import PreprocessingConfig
    from aad_med.training.checkpoint import load_checkpoint, save_checkpoint

    root = tmp_path_factory.mktemp("omnibus_scale")
    generate_cohort(root / "train", 6, "reference", seed=100, shape=SHAPE, id_prefix="T_")
    generate_cohort(root / "a", 6, "reference", seed=1, shape=SHAPE, id_prefix="A_")
    generate_cohort(root / "b", 6, SHIFTED, seed=2, shape=SHAPE, id_prefix="B_")
    for name, (site, seed) in OTHERS.items():
        generate_cohort(root / name, 4, site, seed=seed, shape=SHAPE, id_prefix=f"{name}_")
    pre = PreprocessingConfig(patch_size=16, min_brain_fraction=0.25, eval_stride=8)
    ckpt = train_tiny_checkpoint(
        root / "ckpt.pt", root / "train", pre, epochs=2, feature_reference=True
    )
    # The same weights without the stored reference: an older checkpoint.
    state = load_checkpoint(ckpt)
    state.pop("feature_reference")
    old = save_checkpoint(root / "old.pt", state)
    return {"root": root, "ckpt": ckpt, "old": old}


def _run(setup, names, ckpt, out, **kw) -> dict:
    settings = CompareSettings(
        n_permutations=199,
        n_bootstrap=50,
        seed=3,
        regional=False,
        decode_means=False,
        progress=False,
        cache_dir=setup["root"] / "cache",
        **kw,
    )
    cohorts = {n: setup["root"] / n for n in names}
    return run_comparison(ckpt, cohorts, setup["root"] / out, settings)


def _pair(result: dict, a: str, b: str) -> dict:
    return next(p for p in result["pairs"] if (p["a"], p["b"]) == (a, b))


KEYS = ("aad", "aad_unbiased", "aad_p", "mmd2", "mmd_p", "energy", "energy_p", "omnibus_p")


@pytest.mark.slow
def test_same_pair_same_numbers_in_a_2_and_a_7_cohort_call(setup):
    two = _run(setup, ["a", "b"], setup["ckpt"], "two")
    seven = _run(setup, ["a", "b", *OTHERS], setup["ckpt"], "seven")
    assert two["scale"] == seven["scale"] == "checkpoint"
    p2, p7 = _pair(two, "a", "b"), _pair(seven, "a", "b")
    for key in KEYS:
        assert p2[key] == pytest.approx(p7[key], rel=1e-9, abs=1e-12), key
    assert p2["omnibus_components"] == pytest.approx(p7["omnibus_components"], rel=1e-9)
    assert p2["omnibus_driver"] == p7["omnibus_driver"]
    # The FDR adjustment is across the call's pairs, so it may differ; the raw p may not.
    assert len(seven["pairs"]) == 21 and len(two["pairs"]) == 1

    # distances.json: the omnibus keys per pair, consistent with the other statistics.
    saved = json.loads((setup["root"] / "seven" / "distances.json").read_text())
    assert saved["scale"] == "checkpoint" and "omnibus_p" in saved["definitions"]
    from aad_med.distances.univariate import bh_fdr

    ps = [p["omnibus_p"] for p in saved["pairs"]]
    np.testing.assert_allclose([p["omnibus_p_fdr"] for p in saved["pairs"]], bh_fdr(ps))
    for p in saved["pairs"]:
        assert set(OMNIBUS_KEYS) <= set(p)
        assert set(p["omnibus_components"]) == {"aad", "mmd", "energy", "fingerprint"}
        assert p["omnibus_driver"] == min(p["omnibus_components"], key=p["omnibus_components"].get)
        # (the permutation engine works in float32 products: equal to ~1e-7)
        assert p["omnibus_statistics"]["aad"] == pytest.approx(p["aad"], rel=1e-6)
        # Exact permutation p-values on the (k+1)/(B+1) grid, never below the smallest component.
        k = p["omnibus_p"] * 200
        assert abs(k - round(k)) < 1e-6 and p["omnibus_p"] >= min(p["omnibus_components"].values())
    # The report leads with the verdict.
    md = (setup["root"] / "seven" / "report.md").read_text()
    assert md.index("## Do the cohorts differ at all?") < md.index("## Cohorts")
    assert "a vs b: do they differ at all?" in md


@pytest.mark.slow
def test_old_checkpoint_pooled_or_reference_cohort(setup):
    # Without a stored reference the scale is pooled and the pair's AAD depends on the company:
    # what the fixed scale is for.
    two = _run(setup, ["a", "b"], setup["old"], "old_two")
    seven = _run(setup, ["a", "b", *OTHERS], setup["old"], "old_seven")
    assert two["scale"] == seven["scale"] == "pooled"
    assert _pair(two, "a", "b")["aad"] != pytest.approx(_pair(seven, "a", "b")["aad"], rel=1e-3)
    # embedding.reference=COHORT fixes it; with the training subjects as the reference cohort
    # the numbers are those of the checkpoint's own reference.
    ref = _run(setup, ["a", "b"], setup["old"], "ref_two", scale_reference=setup["root"] / "train")
    ref7 = _run(
        setup,
        ["a", "b", *OTHERS],
        setup["old"],
        "ref_seven",
        scale_reference=setup["root"] / "train",
    )
    assert ref["scale"] == ref7["scale"] == "reference"
    assert list((setup["root"] / "cache").glob("reference-*.json"))
    new = _run(setup, ["a", "b"], setup["ckpt"], "new_two")
    for key in ("aad", "aad_p", "omnibus_p"):
        assert _pair(ref, "a", "b")[key] == pytest.approx(_pair(ref7, "a", "b")[key], rel=1e-9)
        assert _pair(ref, "a", "b")[key] == pytest.approx(_pair(new, "a", "b")[key], rel=1e-9)


def test_omnibus_step_is_calibrated_over_same_site_splits():
    """Same-site splits through the step aad-compare runs (3 cohorts a call, pairs and FDR):
    the share of pairs flagged stays at alpha within Monte-Carlo error."""
    rng = np.random.default_rng(7)
    n_pool, alpha, splits, b = 60, 0.05, 200, 99
    # Heavy-tailed, correlated features and a fingerprint that shares their subjects.
    latent = rng.standard_t(3, size=(n_pool, 6))
    features = np.hstack([latent, latent[:, :3] ** 2, rng.standard_t(4, size=(n_pool, 5))])
    fingerprint = np.hstack(
        [latent[:, :2] + rng.normal(size=(n_pool, 2)), rng.gamma(2, size=(n_pool, 4))]
    )
    flagged, flagged_fdr, grid = 0, 0, True
    for s in range(splits):
        idx = rng.permutation(n_pool)[:24].reshape(3, 8)
        names = ["x", "y", "z"]
        pairs = [{"a": "x", "b": "y"}, {"a": "x", "b": "z"}, {"a": "y", "b": "z"}]
        add_omnibus(
            pairs,
            {n: features[i] for n, i in zip(names, idx, strict=True)},
            {n: fingerprint[i] for n, i in zip(names, idx, strict=True)},
            n_permutations=b,
            seed=s,
        )
        first = pairs[0]  # one pair per split: independent across splits
        flagged += first["omnibus_p"] < alpha
        flagged_fdr += min(p["omnibus_p_fdr"] for p in pairs) < alpha
        grid &= all(
            abs(p["omnibus_p"] * (b + 1) - round(p["omnibus_p"] * (b + 1))) < 1e-9 for p in pairs
        )
    se = np.sqrt(alpha * (1 - alpha) / splits)
    assert grid
    assert flagged / splits <= alpha + 2 * se, flagged
    # Family-wise: with BH over 3 null pairs, any pair flagged stays near alpha too.
    assert flagged_fdr / splits <= alpha + 2 * se, flagged_fdr
    # Not a test that cannot fail: a shifted cohort is flagged.
    pairs = [{"a": "x", "b": "y"}]
    shifted = features[8:16] + np.r_[np.zeros(6), np.zeros(3), 1.5 * np.ones(5)]
    add_omnibus(pairs, {"x": features[:8], "y": shifted}, None, n_permutations=b, seed=0)
    assert pairs[0]["omnibus_p"] < alpha and "fingerprint" not in pairs[0]["omnibus_components"]
