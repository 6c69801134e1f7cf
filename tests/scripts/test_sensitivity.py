"""scripts/sensitivity.py --quick: writes the JSON, CSV, plot and Markdown section, consistently."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "sensitivity.py"


@pytest.fixture(scope="module")
def sensitivity():
    spec = importlib.util.spec_from_file_location("sensitivity_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_every_output(sensitivity, tmp_path):
    out = tmp_path / "sens"
    assert sensitivity.main(["--quick", "--out", str(out), "--threads", "1"]) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    # Quick mode runs both scales: every standardised set twice, latent and fingerprint once.
    feats = [
        label for f in sensitivity.DEFAULT_FEATURES for label in sensitivity.with_scale(f, "both")
    ] + [sensitivity.FINGERPRINT]
    assert result["features"] == feats and result["scale"] == "both"
    assert "latent@checkpoint" not in feats and "multiscale+texture@checkpoint" in feats
    assert "omnibus:multiscale+texture@checkpoint" in feats
    fr = result["feature_reference"]
    assert fr["n_subjects"] == 6 and {"multiscale", "input_texture"} <= set(fr["blocks"])
    scales = {r["features"]: r["scale"] for r in result["same_site"]}
    assert scales["multiscale@checkpoint"] == "checkpoint" and scales["multiscale"] == "pooled"
    assert scales[sensitivity.FINGERPRINT] == "raw"
    assert result["alpha"] == 0.05 and result["shape"] == [24, 24, 20]
    # One row per shift kind x feature set (target severity only), one null row per feature set.
    assert {(r["shift"], r["features"]) for r in result["results"]} == {
        (k, f) for k in ("noise", "population") for f in feats
    }
    assert all(r["target"] and r["n"] == 5 and r["repeats"] == 2 for r in result["results"])
    assert all(0.0 <= r["detection_rate"] <= 1.0 for r in result["results"])
    assert [r["features"] for r in result["same_site"]] == feats
    assert all(r["repeats"] == 10 and r["fpr"] in {i / 10 for i in range(11)}
               for r in result["same_site"])  # fmt: skip
    assert result["best"]["5"] in (*feats, None)

    with open(out / "sensitivity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result["results"]) + len(result["same_site"])
    by_key = {(r["shift"], r["features"]): float(r["rate"]) for r in rows}
    for r in result["results"]:
        assert by_key[(r["shift"], r["features"])] == r["detection_rate"]
    for r in result["same_site"]:
        assert by_key[("same_site", r["features"])] == r["fpr"]

    png = (out / "sensitivity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    md = (out / "sensitivity.md").read_text()
    assert md.startswith("## Sensitivity to acquisition and population shifts")
    assert "python scripts/sensitivity.py --quick" in md
    assert "| multiscale+texture |" in md and "intensity_fingerprint (raw-image statistic)" in md
    assert "| intensity_shape |" in md and "| intensity_variation |" in md
    assert "| multiscale+texture@checkpoint |" in md and "fitted on 6 subjects" in md
    assert "**omnibus** (min-p of AAD, MMD, energy on multiscale+texture + fingerprint)" in md
    assert "untrained tiny encoder" in md

    # Omnibus rows: p-values on the permutation grid, drivers name real components and account
    # for every detection.
    omni = [r for r in result["results"] if r["features"].startswith(sensitivity.OMNIBUS)]
    assert {r["features"] for r in omni} == {f for f in feats if f.startswith(sensitivity.OMNIBUS)}
    for r in omni:
        assert set(r["drivers"]) <= {"aad", "mmd", "energy", "fingerprint"}
        assert sum(r["drivers"].values()) == round(r["detection_rate"] * r["repeats"])
    # Per-block effect sizes for each shift: every raw block but the position lattice.
    assert set(result["block_effects"]) == {"noise 12%", "brain 0.88, tumour 1.5"}
    for blocks in result["block_effects"].values():
        names = [b["block"] for b in blocks]
        assert "intensity_shape" in names and sensitivity.FINGERPRINT in names
        assert "position_matched" not in names
        for b in blocks:
            assert 0 <= b["columns_abs_d_over_1"] <= b["columns"] and b["max_abs_d"] >= 0
    assert "### Where the signal is: noise 12%" in md
    assert not result["best"]["5"] or not result["best"]["5"].startswith(sensitivity.OMNIBUS)


def test_omnibus_row_uses_the_same_shuffles_as_its_components(sensitivity):
    """On fabricated blocks, the omnibus p-value is at most a few times the smallest component
    p-value (min-p), and never below 1/(B+1)."""
    rng = np.random.default_rng(0)
    blocks = {
        "multiscale": rng.normal(size=(20, 6)),
        "texture": rng.normal(size=(20, 5)),
        sensitivity.FINGERPRINT: rng.normal(size=(20, 4)),
    }
    shifted = {k: v.copy() for k, v in blocks.items()}
    shifted[sensitivity.FINGERPRINT][:, 0] += 3.0  # only the fingerprint sees it
    ia, ib = np.arange(10), np.arange(10, 20)
    name = sensitivity.OMNIBUS + "multiscale+texture"
    p, driver = sensitivity.test_pair(name, blocks, ia, shifted, ib, 199, seed=0)
    assert driver == "fingerprint" and 1 / 200 <= p <= 0.02
    p_aad, drv = sensitivity.test_pair("multiscale+texture", blocks, ia, shifted, ib, 199, seed=0)
    assert drv is None and p_aad > 0.05


def _blocks(sensitivity, rng, n, shift=0.0):
    return {
        "multiscale": rng.normal(size=(n, 6)) + shift,
        "texture": rng.normal(size=(n, 5)) * 3.0,
        sensitivity.FINGERPRINT: rng.normal(size=(n, 4)),
    }


def test_fixed_scale_vectors_do_not_depend_on_the_other_sample(sensitivity):
    """With the checkpoint's reference a subject's vector is the same whichever cohort it is
    compared with (issue 18's 'company'); the pooled scale changes it."""
    from aad_med.embedding.standardize import fit_block

    rng = np.random.default_rng(1)
    train, a = _blocks(sensitivity, rng, 12), _blocks(sensitivity, rng, 8)
    b1, b2 = _blocks(sensitivity, rng, 8), _blocks(sensitivity, rng, 8, 5.0)
    reference = {"blocks": {k: fit_block(train[k]) for k in ("multiscale", "texture")}}
    name, ia = "multiscale+texture", np.arange(8)
    fixed1 = sensitivity.finalised(name, a, ia, b1, ia, reference)["a"]
    fixed2 = sensitivity.finalised(name, a, ia, b2, ia, reference)["a"]
    np.testing.assert_allclose(fixed1, fixed2)
    pooled1 = sensitivity.finalised(name, a, ia, b1, ia)["a"]
    pooled2 = sensitivity.finalised(name, a, ia, b2, ia)["a"]
    assert np.abs(pooled1 - pooled2).max() > 0.1
    # The fixed map is the training subjects' centre and scale, block weight 1/sqrt(width):
    # the standardised mean shift of each multiscale column is the raw one over its scale.
    fb = sensitivity.finalised(name, a, ia, b2, ia, reference)
    scale = np.asarray(reference["blocks"]["multiscale"]["scale"])
    raw_shift = b2["multiscale"].mean(axis=0) - a["multiscale"].mean(axis=0)
    got = (fb["b"][:, :6].mean(axis=0) - fb["a"][:, :6].mean(axis=0)) * np.sqrt(6)
    np.testing.assert_allclose(got, raw_shift / scale, rtol=1e-9)
    # Same splits, both scales: a real shift is detected either way.
    p_fixed, _ = sensitivity.test_pair(name + sensitivity.FIXED, a, ia, b2, ia, 199, 0, reference)
    p_pooled, _ = sensitivity.test_pair(name, a, ia, b2, ia, 199, 0, reference)
    assert p_fixed <= 0.01 and p_pooled <= 0.01


def test_fixed_scale_needs_a_reference_covering_every_block(sensitivity):
    from aad_med.embedding.standardize import fit_block

    rng = np.random.default_rng(2)
    a, b = _blocks(sensitivity, rng, 6), _blocks(sensitivity, rng, 6)
    ia = np.arange(6)
    label = "multiscale+texture" + sensitivity.FIXED
    with pytest.raises(ValueError, match="no feature reference"):
        sensitivity.test_pair(label, a, ia, b, ia, 19, 0)
    partial = {"blocks": {"multiscale": fit_block(a["multiscale"])}}
    with pytest.raises(ValueError, match="texture"):
        sensitivity.test_pair(label, a, ia, b, ia, 19, 0, partial)
    assert sensitivity.with_scale("latent", "both") == ["latent"]
    assert sensitivity.with_scale("texture", "checkpoint") == ["texture@checkpoint"]
    assert sensitivity.parse(["--checkpoint", "c.pt"]).scale == "pooled"


def test_full_mode_needs_a_checkpoint(sensitivity):
    with pytest.raises(SystemExit) as e:
        sensitivity.parse(["--out", "x"])
    assert e.value.code == 2


@pytest.mark.slow
def test_omnibus_power_is_at_least_each_components_on_quick_pools(sensitivity, tmp_path):
    """The quick suite's encoder, volumes and shifts (plus gamma and blur), at 10 subjects per
    cohort and 10 repeats: the omnibus on the default features detects every shift at least as
    often as each of its components (AAD, MMD, energy, fingerprint) on the same shuffles.

    At the quick mode's own 5 per cohort and 2 repeats the min-p combination can fall short of
    its best component (noise: omnibus 1 of 2, fingerprint 2 of 2), because with 252 labellings
    one component's floor is not far enough below alpha to survive the combination.
    """
    import torch

    from aad_med import DEFAULT_FEATURES
    from aad_med.data.preprocessing import PreprocessingConfig
    from aad_med.data.synthetic import generate_cohort
    from aad_med.distances.omnibus import default_components, omnibus_permutation_test

    torch.set_num_threads(1)
    model = sensitivity.quick_model()
    prep = PreprocessingConfig(patch_size=8, min_brain_fraction=0.25)
    shape, n, repeats, alpha = (24, 24, 20), 10, 10, 0.05

    def pool(name, site, seed, size):
        folder = tmp_path / name
        generate_cohort(folder, n_subjects=size, site=site, seed=seed, shape=shape)
        return sensitivity.encode_pool(model, prep, folder, 24, None)

    ref = pool("reference", sensitivity.REFERENCE, 0, 2 * n)
    rng = np.random.default_rng(0)
    for k, kind in enumerate(("noise", "population", "gamma", "blur")):
        _, changes = sensitivity.SHIFTS[kind][-1]
        site = sensitivity.REFERENCE.with_updates(name=kind, **changes)
        shifted = pool(kind, site, 1000 + k, n)
        hits: dict[str, int] = {}
        for r in range(repeats):
            ia, ib = rng.choice(2 * n, n, replace=False), np.arange(n)
            f = sensitivity.finalised(DEFAULT_FEATURES, ref, ia, shifted, ib)
            fp = (ref[sensitivity.FINGERPRINT][ia], shifted[sensitivity.FINGERPRINT][ib])
            res = omnibus_permutation_test(default_components(f["a"], f["b"], *fp), 199, seed=r)
            for name, p in (("omnibus", res.omnibus_p), *res.pvalues.items()):
                hits[name] = hits.get(name, 0) + (p < alpha)
        assert set(hits) == {"omnibus", "aad", "mmd", "energy", "fingerprint"}
        assert all(hits["omnibus"] >= v for v in hits.values()), (kind, hits)
        assert hits["omnibus"] >= 8, (kind, hits)  # the shifts are seen, not only tied at 0
