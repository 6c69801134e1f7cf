"""Embedding: shapes, the subject vector is the mean of its patch latents, streaming, caching,
outputs and the regional accumulation."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch

from aad_med import CHANNELS
from aad_med.data.datasets import build_eval_dataset
from aad_med.data.patches import eval_patch_grid, eval_patch_positions
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.embedding import (
    embed_cohort,
    embed_cohorts,
    get_feature_set,
    read_embeddings_csv,
    read_embeddings_npz,
    write_embeddings_csv,
    write_embeddings_npz,
)
from aad_med.embedding import encode as encode_mod
from aad_med.embedding.decode import decode_mean_difference
from aad_med.embedding.encode import encode_subject
from aad_med.embedding.regional import regional_aad_map, shared_space_problem
from aad_med.errors import CheckpointError, ConfigError


def count_encode_calls(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = model.encode

    def counting(x):
        calls.append(int(x.shape[0]))
        return original(x)

    monkeypatch.setattr(model, "encode", counting)
    return calls


def test_shapes_and_vector_is_mean_of_patch_latents(model, cohorts, preprocessing):
    emb = embed_cohort(
        model, cohorts["siteA"], preprocessing, batch_size=5, features="latent", progress=False
    )
    assert emb.subject_ids == cohorts["siteA"].subject_ids
    assert emb.vectors.shape == (3, 6) and emb.latent_means.shape == (3, 6)
    assert emb.vectors.dtype == np.float64 and emb.features == "latent"
    np.testing.assert_array_equal(emb.vectors, emb.latent_means)
    assert all(os.path.isdir(p) for p in emb.paths)
    ds = build_eval_dataset(cohorts["siteA"].subjects, preprocessing)
    for i in range(3):
        item = ds[i]
        patches, _ = eval_patch_grid(item["image"], item["brain"], 8, preprocessing.stride, 0.25)
        with torch.no_grad():
            z = model.encode(patches).double().numpy()
        assert emb.n_patches[i] == len(patches) > 1
        np.testing.assert_allclose(emb.vectors[i], z.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_vectors(model, cohorts, preprocessing):
    a = embed_cohort(
        model, cohorts["siteA"], preprocessing, batch_size=1, features="latent", progress=False
    )
    b = embed_cohort(
        model, cohorts["siteA"], preprocessing, batch_size=64, features="latent", progress=False
    )
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefetch", [False, True])
def test_streaming_holds_at_most_one_subject_ahead(
    model, cohorts, preprocessing, monkeypatch, prefetch
):
    events: list[str] = []
    real = encode_mod.PreprocessedSubjects

    class Spy(real):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            events.append(f"load{i}")
            return item

    monkeypatch.setattr(encode_mod, "PreprocessedSubjects", Spy)
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda x: (events.append("encode"), original(x))[1])
    embed_cohort(
        model,
        cohorts["siteA"],
        preprocessing,
        batch_size=1000,
        features="latent",
        progress=False,
        prefetch=prefetch,
    )
    loads = [events.index(f"load{i}") for i in range(3)]
    encodes = [i for i, e in enumerate(events) if e == "encode"]
    assert len(encodes) == 3 and encodes == sorted(encodes)
    # Without prefetching a subject is encoded before the next is loaded; with it, the next
    # one may be ready early, never the one after: at most two subjects in memory.
    ahead = 1 if prefetch else 0
    for i in range(3):
        assert encodes[i] > loads[i]
        if i + 1 + ahead < 3:
            assert loads[i + 1 + ahead] > encodes[i]


def test_cache_hit_does_not_reencode_and_file_change_does(
    model, cohorts, preprocessing, tmp_path, monkeypatch
):
    calls = count_encode_calls(model, monkeypatch)
    kw = dict(
        checkpoint_hash="abc", cache_dir=tmp_path / "cache", features="latent", progress=False
    )
    first = embed_cohorts(model, cohorts, preprocessing, **kw)
    n_first = len(calls)
    assert n_first > 0 and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    second = embed_cohorts(model, cohorts, preprocessing, **kw)
    assert len(calls) == n_first  # cache hit: no encoding
    for name in cohorts:
        np.testing.assert_array_equal(first[name].vectors, second[name].vectors)
        assert second[name].subject_ids == first[name].subject_ids
    # Another checkpoint or a touched file means a new key: that cohort is encoded again.
    embed_cohorts(
        model, {"siteB": cohorts["siteB"]}, preprocessing, **{**kw, "checkpoint_hash": "other"}
    )
    assert len(calls) > n_first
    n_second = len(calls)
    f = cohorts["siteA"].subjects[0].images["t1"].path
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    embed_cohorts(model, cohorts, preprocessing, **kw)
    assert len(calls) > n_second


def test_no_cache_without_checkpoint_hash(model, cohorts, preprocessing, tmp_path):
    embed_cohorts(
        model, cohorts, preprocessing, cache_dir=tmp_path / "c", features="latent", progress=False
    )
    assert not (tmp_path / "c").exists()


def test_outputs_roundtrip(model, cohorts, preprocessing, tmp_path):
    embs = embed_cohorts(model, cohorts, preprocessing, features="latent", progress=False)
    csv_path = write_embeddings_csv(tmp_path / "embeddings.csv", embs)
    npz_path = write_embeddings_npz(tmp_path / "embeddings.npz", embs)
    header = next(csv.reader(csv_path.open()))
    assert header == ["subject_id", "cohort", "path", "n_patches", *(f"z{j}" for j in range(6))]
    back = read_embeddings_csv(csv_path)
    assert list(back) == ["siteA", "siteB"]
    for name in embs:
        np.testing.assert_array_equal(back[name], embs[name].vectors)  # full precision
        np.testing.assert_array_equal(read_embeddings_npz(npz_path)[name], embs[name].vectors)
    with np.load(npz_path) as d:
        assert d["names"].tolist() == embs["siteA"].subject_ids + embs["siteB"].subject_ids
        assert d["cohorts"].tolist() == ["siteA"] * 3 + ["siteB"] * 2
        assert d["latent_means"].shape == (5, 6) and str(d["features"]) == "latent"


def test_mismatch_and_unknown_feature_errors(model, cohorts):
    with pytest.raises(CheckpointError, match="16-voxel patches"):
        embed_cohort(
            model,
            cohorts["siteA"],
            PreprocessingConfig(patch_size=16),
            features="latent",
            progress=False,
        )
    with pytest.raises(ConfigError, match="unknown embedding.features 'nope'"):
        get_feature_set("nope")


def test_regional_latents_and_map(model, cohorts, preprocessing, tmp_path):
    embs = embed_cohorts(
        model,
        cohorts,
        preprocessing,
        keep_positions=True,
        progress=False,
        features="latent",
        checkpoint_hash="h",
        cache_dir=tmp_path / "cache",
    )
    ra, rb = embs["siteA"].regional, embs["siteB"].regional
    assert ra.same_space and ra.ras_shape == (24, 28, 20) and ra.n_images == 3
    assert ra.counts.max() == 3
    # Subject-weighted: the cell means average to about the cohort mean latent.
    assert shared_space_problem({"a": ra, "b": rb}) is None
    m, bg = regional_aad_map(ra, rb)
    assert m.shape == bg.shape == (24, 28, 20)
    assert np.isfinite(m).any() and np.nanmin(m) >= 0
    # Cached entries keep the regional part.
    again = embed_cohorts(
        model,
        cohorts,
        preprocessing,
        keep_positions=True,
        progress=False,
        features="latent",
        checkpoint_hash="h",
        cache_dir=tmp_path / "cache",
    )
    np.testing.assert_array_equal(again["siteA"].regional.sums, ra.sums)
    rb.ras_shape = (30, 28, 20)
    assert "not in one image space" in shared_space_problem({"a": ra, "b": rb})


def test_decode_mean_difference(model):
    d = decode_mean_difference(model, np.zeros(6), np.zeros(6))
    assert d.shape == (4, 8, 8, 8) and np.all(d == 0)
    d = decode_mean_difference(model, np.zeros(6), np.ones(6))
    assert np.abs(d).max() > 0


@pytest.mark.parametrize("features", ["latent", "multiscale"])
def test_encode_subject_is_the_per_subject_step_of_embed_cohort(
    model, cohorts, preprocessing, features
):
    emb = embed_cohort(
        model, cohorts["siteA"], preprocessing, batch_size=4, features=features, progress=False
    )
    ds = build_eval_dataset(cohorts["siteA"].subjects, preprocessing)
    fs = get_feature_set(features)
    for i in range(len(ds)):
        item = ds[i]
        enc = encode_subject(
            model, item, preprocessing, torch.device("cpu"), 4, fs, keep_latents=True
        )
        np.testing.assert_array_equal(enc.vector, emb.vectors[i])
        np.testing.assert_array_equal(enc.latent_mean, emb.latent_means[i])
        grid = eval_patch_positions(item["brain"], 8, preprocessing.stride, 0.25)
        np.testing.assert_array_equal(enc.positions, grid.numpy())
        assert enc.n_patches == emb.n_patches[i] and enc.latents.shape == (enc.n_patches, 6)
        np.testing.assert_allclose(enc.latents.mean(axis=0), enc.latent_mean, rtol=1e-5, atol=1e-6)
        assert encode_subject(model, item, preprocessing, "cpu", 4, fs).latents is None


def test_a_model_that_cannot_encode_is_named(model, cohorts, preprocessing, monkeypatch):
    def refuse(x):
        raise ValueError("bad patch")

    monkeypatch.setattr(model, "encode", refuse)
    item = build_eval_dataset(cohorts["siteA"].subjects[:1], preprocessing)[0]
    fs = get_feature_set("latent")
    with pytest.raises(ValueError, match="bad patch"):
        encode_subject(model, item, preprocessing, torch.device("cpu"), 4, fs)
    folder = os.path.dirname(cohorts["siteA"].subjects[0].images["t1"].path)
    with pytest.raises(CheckpointError, match=f"{folder}: model cannot encode these patches"):
        embed_cohort(model, cohorts["siteA"], preprocessing, features="latent", progress=False)


def test_embed_settings_are_the_one_option_list(model, cohorts, preprocessing):
    from aad_med import DEFAULT_FEATURES
    from aad_med.embedding import EmbedSettings

    assert EmbedSettings().features == DEFAULT_FEATURES
    base = EmbedSettings(batch_size=5, features="latent", progress=False)
    assert EmbedSettings.resolve(base, {"batch_size": 7}).batch_size == 7
    assert EmbedSettings.resolve(base, {}) is base
    with pytest.raises(TypeError, match="unknown embedding option"):
        EmbedSettings.resolve(None, {"batchsize": 7})
    # A settings object and the same options as keywords give the same vectors.
    by_object = embed_cohort(model, cohorts["siteA"], preprocessing, base)
    by_keywords = embed_cohort(
        model, cohorts["siteA"], preprocessing, batch_size=5, features="latent", progress=False
    )
    np.testing.assert_array_equal(by_object.vectors, by_keywords.vectors)


def test_cuda_encoding_runs_in_full_precision_and_restores_the_flags(recwarn):
    # The flags are process-wide: checked without a GPU, so CI checks what a GPU run relies on
    # (vectors equal to the CPU's up to rounding, to be mixed in caches and references).
    before = torch.backends.cudnn.allow_tf32
    with encode_mod._full_precision(torch.device("cuda")):
        assert torch.backends.cudnn.allow_tf32 is False
        assert not torch.is_autocast_enabled("cuda")
    assert torch.backends.cudnn.allow_tf32 is before
    assert not [w for w in recwarn if "tf32" in str(w.message).lower()]


def test_mid_slices_an_item_carries_are_kept_for_the_report_thumbnails(
    model, cohorts, preprocessing, monkeypatch
):
    """An item holding its subject's middle slices (a cached subject's, or a worker's) hands
    them to the report's thumbnails (data.io.MID_SLICES) and not on to the encoding."""
    from aad_med.data.io import MID_SLICES

    cohort = cohorts["siteB"]
    real = encode_mod.PreprocessedSubjects.__getitem__
    given = {}

    def with_slices(self, i):
        item = real(self, i)
        shape = tuple(item["ras_shape"][:2])
        given[i] = np.random.default_rng(i).normal(size=(4, *shape)).astype(np.float32)
        item["mid_slices"] = given[i]
        return item

    MID_SLICES.clear()
    monkeypatch.setattr(encode_mod.PreprocessedSubjects, "__getitem__", with_slices)
    emb = encode_mod.embed_cohort(model, cohort, preprocessing, features="latent", progress=False)
    assert len(emb) == len(cohort.subjects) == len(given)
    for i, rec in enumerate(cohort.subjects):
        for c, ch in enumerate(CHANNELS):
            np.testing.assert_array_equal(MID_SLICES.get(rec.images[ch]), given[i][c])
    MID_SLICES.clear()
