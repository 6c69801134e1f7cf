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
    feats = list(sensitivity.DEFAULT_FEATURES) + [sensitivity.FINGERPRINT]
    assert result["features"] == feats
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
    assert result["best"]["5"] in (*sensitivity.DEFAULT_FEATURES, None)

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
