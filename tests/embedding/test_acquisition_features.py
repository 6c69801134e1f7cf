"""Acquisition-sensitive feature sets: shapes, values, joint standardisation, the ``latent``
equivalence, and calibration of every feature set on same-site null splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aad_med.data.datasets import build_eval_dataset
from aad_med.data.intensity import intensity_fingerprint
from aad_med.data.patches import eval_patch_positions, extract_patches
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.validation import load_cohort
from aad_med.distances import aad_permutation_test
from aad_med.embedding import available_feature_sets, embed_cohorts, get_feature_set
from aad_med.embedding.acquisition import (
    ConcatFeatureSet,
    PositionMatchedFeatures,
    standardize_jointly,
)
from aad_med.embedding.features import PatchBatch
from aad_med.models import ConvAutoencoder
from tests.nifti_factory import write_brats_cohort

NEW_SETS = [
    "multiscale",
    "dispersion",
    "position_matched",
    "latent+multiscale",
    "latent+multiscale+dispersion",
    "texture",
    "latent+multiscale+texture",
]
LATENT_DIM = 6
STAGE_CHANNELS = (4, 8)  # the conftest model
EXPECTED_DIM = {
    "latent": LATENT_DIM,
    "multiscale": 2 * sum(STAGE_CHANNELS),
    "dispersion": 2 * LATENT_DIM,
    "position_matched": 2 * LATENT_DIM,
    "latent+multiscale": LATENT_DIM + 2 * sum(STAGE_CHANNELS),
    "latent+multiscale+dispersion": 3 * LATENT_DIM + 2 * sum(STAGE_CHANNELS),
    "texture": 4 + sum(STAGE_CHANNELS),
    "latent+multiscale+texture": LATENT_DIM + 2 * sum(STAGE_CHANNELS) + 4 + sum(STAGE_CHANNELS),
}


def test_feature_sets_are_registered_on_import():
    assert set(NEW_SETS) <= set(available_feature_sets())


# --------------------------------------------------------------------------------------------
# through the real embedding pipeline


def _tiny_model():
    torch.manual_seed(0)
    return ConvAutoencoder(
        channels=STAGE_CHANNELS, strides=(2, 2), latent_dim=LATENT_DIM, patch_size=8,
        num_res_units=0, norm="BATCH",
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The conftest's tiny cohorts and model, embedded once with every feature set."""
    root = tmp_path_factory.mktemp("acq")
    cohorts = {
        "siteA": load_cohort(write_brats_cohort(root / "siteA", n=3)),
        "siteB": load_cohort(write_brats_cohort(root / "siteB", n=2, scale=1.5)),
    }
    model, prep = _tiny_model(), PreprocessingConfig(patch_size=8, min_brain_fraction=0.25)
    embedded = {
        name: embed_cohorts(model, cohorts, prep, features=name, progress=False)
        for name in ["latent", *NEW_SETS]
    }
    return model, cohorts, prep, embedded


def _manual_latent_means(model, cohort, preprocessing):
    ds = build_eval_dataset(list(cohort.subjects), preprocessing, cache="none")
    rows = []
    for i in range(len(ds)):
        item = ds[i]
        image = torch.as_tensor(item["image"])
        pos = eval_patch_positions(
            torch.as_tensor(item["brain"]),
            preprocessing.patch_size,
            preprocessing.stride,
            preprocessing.min_brain_fraction,
        )
        with torch.no_grad():
            z = model.encode(extract_patches(image, pos, preprocessing.patch_size))
        rows.append(z.double().mean(dim=0).numpy())
    return np.stack(rows)


def test_shapes_and_joint_standardisation(pipeline):
    _, cohorts, _, embedded = pipeline
    for name in NEW_SETS:
        embs = embedded[name]
        for cname, e in embs.items():
            assert e.vectors.shape == (len(cohorts[cname].subjects), EXPECTED_DIM[name]), name
            assert e.latent_means.shape == (len(cohorts[cname].subjects), LATENT_DIM)
            assert e.features == name
            assert np.all(np.isfinite(e.vectors))
        pooled = np.concatenate([e.vectors for e in embs.values()])
        # Fitted once on all subjects: pooled mean 0; per-cohort means are not forced to 0.
        np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-10)
        assert np.abs(embs["siteA"].vectors.mean(axis=0)).max() > 1e-3, name
        if name in ("multiscale", "texture", "dispersion", "position_matched"):
            sd = pooled.std(axis=0)
            assert np.all(np.isclose(sd, 1.0) | np.isclose(sd, 0.0)), name
            assert np.isclose(sd, 1.0).sum() > 0


def test_latent_equivalence_with_the_plain_mean_of_patch_latents(pipeline):
    model, cohorts, preprocessing, embedded = pipeline
    plain = embedded["latent"]
    for cname, cohort in cohorts.items():
        manual = _manual_latent_means(model, cohort, preprocessing)
        np.testing.assert_allclose(plain[cname].vectors, manual, rtol=1e-6, atol=1e-7)
        # The statistics' vectors are exactly the latent means, and every other feature set
        # keeps those same latent means alongside its own vectors.
        assert np.array_equal(plain[cname].vectors, plain[cname].latent_means)
        for name in NEW_SETS:
            assert np.array_equal(embedded[name][cname].latent_means, plain[cname].latent_means)


def test_combined_blocks_are_weighted_equally(pipeline):
    embs = pipeline[3]["latent+multiscale"]
    pooled = np.concatenate([e.vectors for e in embs.values()])
    n = pooled.shape[0]
    lat, ms = pooled[:, :LATENT_DIM], pooled[:, LATENT_DIM:]
    for block in (lat, ms):
        live = (block.std(axis=0) > 1e-9).sum()
        # Each live standardised column has sum of squares n, divided by the block width.
        assert np.isclose((block**2).sum(), n * live / block.shape[1])
    # The latent block is the jointly standardised latent mean, scaled.
    ref = standardize_jointly({k: e.latent_means for k, e in embs.items()})
    for k, e in embs.items():
        np.testing.assert_allclose(e.vectors[:, :LATENT_DIM], ref[k] / math.sqrt(LATENT_DIM))


def test_intensity_fingerprint_sees_global_scale(pipeline):
    cohorts = pipeline[1]
    a = intensity_fingerprint(cohorts["siteA"].subjects, percentiles=(50.0,))
    b = intensity_fingerprint(cohorts["siteB"].subjects, percentiles=(50.0,))
    assert a.shape == (3, 4) and b.shape == (2, 4)
    # siteB was written with intensities x1.5 (same anatomy for subjects 0 and 1).
    np.testing.assert_allclose(b / a[:2], 1.5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# fabricated patch streams


def _batches(model, rng, n_patches=12, cells=None, noise=0.0, batch_size=5):
    """A subject as PatchBatch chunks: random patches at random lattice positions."""
    p = model.patch_size
    if cells is None:
        axes = [np.arange(3), np.arange(3), np.arange(2)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        cells = grid[rng.choice(len(grid), n_patches, replace=False)]
    x = torch.as_tensor(rng.standard_normal((len(cells), 4, p, p, p)), dtype=torch.float32)
    x = x + noise * torch.as_tensor(rng.standard_normal(x.shape), dtype=torch.float32)
    pos = torch.as_tensor(np.asarray(cells) * p, dtype=torch.int64)
    with torch.no_grad():
        z = model.encode(x)
    out = []
    for s in range(0, len(cells), batch_size):
        out.append(
            PatchBatch(model, x[s : s + batch_size], z[s : s + batch_size], pos[s : s + batch_size])
        )
    return out, x, z


def _vector(fs, batches):
    acc = fs.accumulator()
    for b in batches:
        acc.add(b)
    return acc.vector()


def test_multiscale_values_and_batching(model):
    rng = np.random.default_rng(1)
    batches, x, _ = _batches(model, rng, n_patches=11)
    fs = get_feature_set("multiscale")
    v = _vector(fs, batches)
    with torch.no_grad():
        stages = model.encode_features(x)
    expected = []
    for h in stages:
        h = h.double().transpose(0, 1).reshape(h.shape[1], -1)
        expected += [h.mean(dim=1).numpy(), h.std(dim=1, unbiased=False).numpy()]
    np.testing.assert_allclose(v, np.concatenate(expected), rtol=1e-6, atol=1e-8)
    one_batch = [PatchBatch(model, x, batches[0].latents.new_zeros(0), batches[0].positions)]
    np.testing.assert_allclose(_vector(fs, one_batch), v, rtol=1e-6, atol=1e-8)


def test_texture_is_roughness_and_scale_free(model):
    rng = np.random.default_rng(4)
    batches, x, _ = _batches(model, rng, n_patches=7)
    fs = get_feature_set("texture")
    v = _vector(fs, batches)
    xd = x.double()
    rough = []
    for c in range(4):
        ch = xd[:, c]
        d2 = np.mean([(torch.diff(ch, dim=a) ** 2).mean().item() for a in (1, 2, 3)])
        rough.append(d2 / ch.var(unbiased=False).item())
    np.testing.assert_allclose(v[:4], rough, rtol=1e-9)
    # White noise has roughness about 2; smoothing lowers it.
    assert np.all(np.abs(v[:4] - 2.0) < 0.2)
    scaled = [PatchBatch(model, 3.0 * b.patches, b.latents, b.positions) for b in batches]
    np.testing.assert_allclose(_vector(fs, scaled)[:4], v[:4], rtol=1e-7)


def test_dispersion_values(model):
    rng = np.random.default_rng(2)
    batches, _, z = _batches(model, rng, n_patches=9)
    v = _vector(get_feature_set("dispersion"), batches)
    zd = z.double().numpy()
    np.testing.assert_allclose(v[:LATENT_DIM], zd.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(v[LATENT_DIM:], zd.std(axis=0), rtol=1e-6, atol=1e-9)


def test_position_matched_cancels_anatomy_that_varies_with_position(model):
    rng = np.random.default_rng(3)
    cells = np.array([[i, j, k] for i in range(3) for j in range(3) for k in range(2)])
    anatomy = rng.normal(0, 50.0, (len(cells), LATENT_DIM))  # large, position-specific
    offsets = rng.normal(0, 1.0, (10, LATENT_DIM))  # what differs between subjects
    fs = PositionMatchedFeatures()
    raws = []
    for s in range(10):
        keep = rng.random(len(cells)) < 0.9
        keep[:4] = True
        z = torch.as_tensor(anatomy[keep] + offsets[s], dtype=torch.float32)
        pos = torch.as_tensor(cells[keep] * model.patch_size, dtype=torch.int64)
        patches = torch.zeros(int(keep.sum()), 4, *(model.patch_size,) * 3)
        acc = fs.accumulator()
        acc.add(PatchBatch(model, patches, z, pos))
        raws.append(acc.vector())
    raw = np.stack(raws)
    out = fs.finalize({"a": raw[:5], "b": raw[5:]})
    vec = np.concatenate([out["a"], out["b"]])
    assert vec.shape == (10, 2 * LATENT_DIM)
    # Per-cell z-scores of a subject offset are the same in every cell (cells all subjects
    # share), so the pooled mean is the standardised offset and the anatomy has gone.
    expected = standardize_jointly({"x": offsets})["x"]
    corr = [np.corrcoef(vec[:, d], expected[:, d])[0, 1] for d in range(LATENT_DIM)]
    assert min(corr) > 0.95


def test_position_matched_refuses_positions_outside_the_lattice(model):
    fs = PositionMatchedFeatures(extent=16)
    p = model.patch_size
    batch = PatchBatch(
        model,
        torch.zeros(1, 4, p, p, p),
        torch.zeros(1, LATENT_DIM),
        torch.tensor([[40, 0, 0]]),
    )
    with pytest.raises(ValueError, match="position lattice"):
        fs.accumulator().add(batch)


def test_concat_rejects_mixed_layouts():
    fs = ConcatFeatureSet(["latent", "dispersion"])
    good = fs.assemble({"latent": np.zeros((2, 3)), "dispersion": np.ones((2, 6))})
    bad = fs.assemble({"latent": np.zeros((2, 4)), "dispersion": np.ones((2, 5))})
    with pytest.raises(ValueError, match="layouts"):
        fs.finalize({"a": good, "b": bad})


ALPHA = 0.05
N_SPLITS = 300


@pytest.fixture(scope="module")
def null_pool():
    """Raw vectors of every feature set for 32 subjects drawn from one distribution."""
    model = _tiny_model()
    rng = np.random.default_rng(7)
    bundle = ConcatFeatureSet(
        ["latent", "multiscale", "texture", "dispersion", PositionMatchedFeatures(extent=32)]
    )
    raws = []
    for _ in range(32):
        batches, _, _ = _batches(model, rng, n_patches=int(rng.integers(8, 16)))
        raws.append(_vector(bundle, batches))
    parts = bundle.split(np.stack(raws))
    return model, dict(zip([p.name for p in bundle.parts], parts, strict=True))


def _raw_for(name, blocks):
    fs = get_feature_set(name)
    return fs, fs.assemble(blocks) if isinstance(fs, ConcatFeatureSet) else blocks[name]


@pytest.mark.parametrize("name", ["latent", *NEW_SETS])
def test_same_site_false_positive_rate_is_alpha(null_pool, name):
    _, blocks = null_pool
    fs, raw = _raw_for(name, blocks)
    rng = np.random.default_rng(11)
    hits = 0
    for i in range(N_SPLITS):
        idx = rng.permutation(raw.shape[0])
        final = fs.finalize({"a": raw[idx[:16]], "b": raw[idx[16:]]})
        p = aad_permutation_test(final["a"], final["b"], n_permutations=199, seed=i).pvalue
        hits += p <= ALPHA
    fpr = hits / N_SPLITS
    se = math.sqrt(ALPHA * (1 - ALPHA) / N_SPLITS)
    assert abs(fpr - ALPHA) < 3 * se, f"{name}: false-positive rate {fpr:.3f}"


def test_multiscale_sees_noise_the_mean_latent_is_not_built_for(null_pool):
    model, blocks = null_pool
    rng = np.random.default_rng(8)
    fs = get_feature_set("multiscale")
    noisy = []
    for _ in range(16):
        batches, _, _ = _batches(model, rng, n_patches=int(rng.integers(8, 16)), noise=0.5)
        noisy.append(_vector(fs, batches))
    final = fs.finalize({"a": blocks["multiscale"][:16], "b": np.stack(noisy)})
    assert aad_permutation_test(final["a"], final["b"], n_permutations=999).pvalue < 0.01
