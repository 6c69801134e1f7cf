"""The preprocessed-subject cache: a second embedding with another encoder decodes nothing and
gives the same vectors; read mode writes nothing; damaged entries heal; the size bound evicts the
least recently used subjects; the fingerprint comes from the same decoded volumes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from aad_med.data import io as data_io
from aad_med.data.intensity import intensity_fingerprint
from aad_med.embedding import encode as encode_mod
from aad_med.embedding.encode import embed_cohort
from aad_med.embedding.preprocessed import (
    PreprocessedCache,
    PreprocessedSubjects,
    cache_mode,
    subject_key,
)
from aad_med.errors import ConfigError
from aad_med.models import ConvAutoencoder


def count_decodes(monkeypatch) -> list:
    calls = []
    real = data_io.read_stored
    monkeypatch.setattr(data_io, "read_stored", lambda *a: calls.append(a[1]) or real(*a))
    return calls


def other_model(patch: int) -> ConvAutoencoder:
    torch.manual_seed(1)
    return ConvAutoencoder(
        channels=(4, 4), strides=(2, 2), latent_dim=3, patch_size=patch, num_res_units=0
    ).eval()


def test_second_encoder_reads_preprocessed_subjects_instead_of_decoding(
    model, cohorts, preprocessing, tmp_path, monkeypatch
):
    cohort = cohorts["siteA"]
    kw = dict(features="latent", progress=False, preprocessed_dir=tmp_path / "pre")
    decodes = count_decodes(monkeypatch)
    first = embed_cohort(model, cohort, preprocessing, **kw)
    assert len(decodes) == 3 * 4  # four channels per subject, the seg is not read
    assert len(list((tmp_path / "pre").glob("*.npys"))) == 3
    assert first.timings["decode"] > 0 and "cache_read" not in first.timings
    decodes.clear()
    second_model = other_model(preprocessing.patch_size)
    cached = embed_cohort(second_model, cohort, preprocessing, **kw)
    assert decodes == []
    assert "decode" not in cached.timings and cached.timings["cache_read"] > 0
    fresh = embed_cohort(second_model, cohort, preprocessing, features="latent", progress=False)
    # Exactly what the same encoder gives on freshly preprocessed subjects.
    np.testing.assert_array_equal(cached.vectors, fresh.vectors)
    np.testing.assert_array_equal(cached.fingerprints, fresh.fingerprints)


def test_fingerprint_from_the_decoded_volumes_equals_reading_them_again(cohorts, preprocessing):
    cohort = cohorts["siteB"]
    ds = PreprocessedSubjects(cohort.subjects, preprocessing)
    rows = np.stack([ds[i]["fingerprint"] for i in range(len(ds))])
    np.testing.assert_array_equal(rows, intensity_fingerprint(cohort.subjects))


def test_read_mode_never_writes(model, cohorts, preprocessing, tmp_path):
    embed_cohort(
        model,
        cohorts["siteB"],
        preprocessing,
        features="latent",
        progress=False,
        preprocessed_dir=tmp_path / "pre",
        cache_mode="read",
    )
    assert not list(tmp_path.glob("pre/*"))


def _flip_last_image_byte(entry):
    """Flip one bit of the image's data (its record ends where the brain's begins): the npy
    headers stay valid, only the checksum can tell."""
    data = bytearray(entry.read_bytes())
    at = data.index(b"\x93NUMPY", data.index(b"\x93NUMPY", 1) + 1) - 1  # before brain's record
    data[at] ^= 0x10
    entry.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda e: e.write_bytes(e.read_bytes()[:200]),
    "cut_before_the_end": lambda e: e.write_bytes(e.read_bytes()[:-7]),
    "trailing_bytes": lambda e: e.write_bytes(e.read_bytes() + b"x"),
    "emptied": lambda e: e.write_bytes(b""),
    "flipped_image_bit": _flip_last_image_byte,
    "not_an_entry": lambda e: e.write_bytes(b"PK\x03\x04" + bytes(300)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_removed_and_recomputed(
    model, cohorts, preprocessing, tmp_path, caplog, monkeypatch, damage
):
    cohort = cohorts["siteB"]
    kw = dict(features="latent", progress=False, preprocessed_dir=tmp_path / "pre")
    good = embed_cohort(model, cohort, preprocessing, **kw)
    entry = tmp_path / "pre" / f"{subject_key(cohort.subjects[0], preprocessing)}.npys"
    intact = entry.read_bytes()
    DAMAGE[damage](entry)
    assert entry.read_bytes() != intact
    decodes = count_decodes(monkeypatch)
    with caplog.at_level("WARNING"):
        again = embed_cohort(model, cohort, preprocessing, **kw)
    assert (
        "removing unreadable preprocessed cache entry" in caplog.text and str(entry) in caplog.text
    )
    assert len(decodes) == 4  # only the damaged subject was decoded again
    np.testing.assert_array_equal(again.vectors, good.vectors)
    assert entry.read_bytes() == intact  # rewritten whole, byte for byte


def test_entry_format_round_trip_and_checks(cohorts, preprocessing, tmp_path):
    """Every array comes back with its dtype and values; the image is the float32 array the
    encoder consumes (writable, C-contiguous: no copy or cast on the way in); the evaluation
    grid kept in the entry is the one the brain mask gives."""
    from aad_med.data.patches import eval_patch_positions
    from aad_med.embedding.preprocessed import eval_positions, read_entry

    ds = PreprocessedSubjects(cohorts["siteA"].subjects, preprocessing, quality=True)
    item = ds.compute(cohorts["siteA"].subjects[0])
    cache = PreprocessedCache(tmp_path / "c")
    cache.put("k", item)
    back = cache.get("k")
    for k in ("image", "brain", "affine", "positions"):
        assert torch.equal(
            torch.as_tensor(back[k]), torch.as_tensor(item[k]).as_subclass(torch.Tensor)
        )
    assert back["image"].dtype == torch.float32 and back["image"].is_contiguous()
    assert back["image"].numpy().flags.writeable
    np.testing.assert_array_equal(back["quality"], item["quality"])
    np.testing.assert_array_equal(back["fingerprint"], item["fingerprint"])
    for k in ("subject_id", "has_seg", "seg_checked", "crop_start", "ras_shape", "spacing"):
        assert back[k] == item[k]
    p = preprocessing
    ref = eval_patch_positions(item["brain"], p.patch_size, p.stride, p.min_brain_fraction)
    assert torch.equal(back["positions"], ref)
    # The grid is only trusted for the settings it was made with.
    coarse = type(p)(patch_size=p.patch_size, eval_stride=p.patch_size // 2)
    other = eval_patch_positions(item["brain"], p.patch_size, p.patch_size // 2, 0.25)
    assert torch.equal(eval_positions(back, coarse, "cpu"), other)
    assert not torch.equal(other, ref)
    with open(cache.path("k"), "rb") as f:
        assert set(read_entry(f)) >= {"image", "positions", "grid", "quality"}


def test_an_old_format_entry_is_never_read_and_ages_out(cohorts, preprocessing, tmp_path):
    ds = PreprocessedSubjects(cohorts["siteA"].subjects, preprocessing)
    item = ds.compute(cohorts["siteA"].subjects[0])
    old = tmp_path / "c" / "k.npz"
    old.parent.mkdir()
    old.write_bytes(bytes(10_000))
    cache = PreprocessedCache(tmp_path / "c")
    assert cache.get("k") is None and old.exists()  # another format: not this entry
    cache.put("k", item)
    size = cache.path("k").stat().st_size
    os.utime(old, ns=(4 * 10**18, 4 * 10**18))  # newer than the entry, yet evicted first
    small = PreprocessedCache(tmp_path / "c", max_bytes=size + 5000)
    assert small.evict() == 1 and not old.exists() and cache.path("k").exists()


def test_size_bound_evicts_least_recently_used(cohorts, preprocessing, tmp_path):
    records = cohorts["siteA"].subjects
    ds = PreprocessedSubjects(records, preprocessing)
    items = [ds.compute(r) for r in records]
    probe = PreprocessedCache(tmp_path / "probe")
    probe.put("x", items[0])
    size = probe.path("x").stat().st_size
    cache = PreprocessedCache(tmp_path / "c", max_bytes=int(2.5 * size))
    for i, item in enumerate(items[:2]):
        cache.put(f"k{i}", item)
        os.utime(cache.path(f"k{i}"), ns=(i * 10**9, i * 10**9))  # k0 older than k1
    assert cache.get("k0") is not None  # a hit makes k0 the most recently used
    cache.put("k2", items[2])
    assert sorted(p.stem for p in (tmp_path / "c").glob("*.npys")) == ["k0", "k2"]


def test_a_second_run_takes_the_input_digests_from_the_cache_folder(
    model, cohorts, preprocessing, tmp_path, monkeypatch
):
    import aad_med.io_utils as io_utils

    cohort = cohorts["siteA"]
    kw = dict(features="latent", progress=False, preprocessed_dir=tmp_path / "pre")
    monkeypatch.setattr(io_utils, "_DIGESTS", {})
    first = embed_cohort(model, cohort, preprocessing, **kw)
    memos = list((tmp_path / "pre" / "digests").glob("*.json"))
    assert len(memos) == len(cohort.subjects)  # one per subject's group of files
    hashed = []
    monkeypatch.setattr(io_utils, "_DIGESTS", {})  # a new process
    monkeypatch.setattr(io_utils, "file_sha256", lambda p, *a: hashed.append(p) or "0" * 64)
    again = embed_cohort(model, cohort, preprocessing, **kw)
    assert hashed == [] and "cache_read" in again.timings
    np.testing.assert_array_equal(again.vectors, first.vectors)
    # Read mode never writes, not even digests.
    monkeypatch.setattr(io_utils, "_DIGESTS", {})
    embed_cohort(
        model, cohort, preprocessing, features="latent", progress=False,
        preprocessed_dir=tmp_path / "ro", cache_mode="read",
    )  # fmt: skip
    assert not (tmp_path / "ro").exists()


def test_changed_file_or_settings_change_the_key(cohorts, preprocessing, tmp_path):
    rec = cohorts["siteA"].subjects[0]
    key = subject_key(rec, preprocessing)
    other = type(preprocessing)(patch_size=preprocessing.patch_size * 2)
    assert subject_key(rec, other) != key
    path = rec.images["t1"].path
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert subject_key(rec, preprocessing) != key


def test_another_quality_definition_changes_the_keys(cohorts, preprocessing, monkeypatch):
    # Entries hold quality rows: rows of another metric definition must never be read back.
    import aad_med.embedding.cache as embedding_cache
    import aad_med.embedding.preprocessed as preprocessed

    rec = cohorts["siteA"].subjects[0]
    key = subject_key(rec, preprocessing)
    args = (cohorts["siteA"], "ckpt", preprocessing, "latent", False)
    cohort_key = embedding_cache.cohort_cache_key(*args)
    monkeypatch.setattr(preprocessed, "QUALITY_VERSION", preprocessed.QUALITY_VERSION + 1)
    monkeypatch.setattr(embedding_cache, "QUALITY_VERSION", preprocessed.QUALITY_VERSION)
    assert subject_key(rec, preprocessing) != key
    assert embedding_cache.cohort_cache_key(*args) != cohort_key


@pytest.mark.parametrize(
    "value,mode",
    [(True, "write"), (False, "off"), ("off", "off"), ("READ", "read"), ("write", "write")],
)
def test_cache_mode_values(value, mode):
    assert cache_mode(value) == mode


def test_cache_mode_refuses_other_values():
    with pytest.raises(ConfigError, match="cache must be one of off, read, write"):
        cache_mode("sometimes")


def test_prefetch_gives_the_same_vectors(model, cohorts, preprocessing):
    kw = dict(features="latent", progress=False)
    a = embed_cohort(model, cohorts["siteA"], preprocessing, prefetch=True, **kw)
    b = embed_cohort(model, cohorts["siteA"], preprocessing, prefetch=False, **kw)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert encode_mod.EmbedSettings().prefetch is False  # measured no gain on 2 busy cores


def test_single_encoder_pass_gives_the_two_pass_vectors(model, cohorts, preprocessing):
    """The latent and the stage activations from one pass equal ``encode`` plus a second
    ``encode_features`` pass (what any other model still gets), bit for bit."""
    from aad_med import DEFAULT_FEATURES
    from aad_med.embedding.encode import encode_subject
    from aad_med.embedding.features import get_feature_set

    class Opaque(torch.nn.Module):  # not a ConvAutoencoder: the generic two-pass path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.patch_size, self.in_channels = inner.patch_size, inner.in_channels

        def encode(self, x):
            return self.inner.encode(x)

        def encode_features(self, x):
            return self.inner.encode_features(x)

    item = PreprocessedSubjects(cohorts["siteA"].subjects, preprocessing)[0]
    fs = get_feature_set(DEFAULT_FEATURES)
    one = encode_subject(model, item, preprocessing, "cpu", 7, fs)
    two = encode_subject(Opaque(model).eval(), item, preprocessing, "cpu", 7, fs)
    np.testing.assert_array_equal(one.vector, two.vector)
    np.testing.assert_array_equal(one.latent_mean, two.latent_mean)


def test_extract_patches_equals_advanced_indexing():
    from aad_med.data.patches import extract_patches

    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 20, 22, 18, generator=g)
    pos = torch.tensor([[0, 0, 0], [3, 5, 7], [12, 14, 10]])
    p = 8
    ar = torch.arange(p)
    ref = image[
        :,
        (pos[:, 0, None] + ar)[:, :, None, None],
        (pos[:, 1, None] + ar)[:, None, :, None],
        (pos[:, 2, None] + ar)[:, None, None, :],
    ].permute(1, 0, 2, 3, 4)
    assert torch.equal(extract_patches(image, pos, p), ref)
    assert extract_patches(image, pos[:0], p).shape == (0, 4, p, p, p)


def test_check_seg_decodes_the_seg_once_refuses_bad_labels_and_heals_unchecked_entries(
    model, cohorts, preprocessing, tmp_path, monkeypatch
):
    import nibabel as nib

    from aad_med.errors import InputError

    cohort = cohorts["siteA"]
    kw = dict(features="latent", progress=False, preprocessed_dir=tmp_path / "pre")
    decodes = count_decodes(monkeypatch)
    unchecked = embed_cohort(model, cohort, preprocessing, **kw)
    assert len(decodes) == 3 * 4 and not unchecked.seg_checked
    decodes.clear()
    # Entries written without the seg check are not trusted for it: decoded again, replaced.
    checked = embed_cohort(model, cohort, preprocessing, check_seg=True, **kw)
    assert len(decodes) == 3 * 5 and checked.seg_checked
    np.testing.assert_array_equal(checked.vectors, unchecked.vectors)
    decodes.clear()
    assert embed_cohort(model, cohort, preprocessing, check_seg=True, **kw).seg_checked
    assert decodes == []
    # A seg label outside the accepted set is refused by the embedding's decode, naming the file.
    bad = cohort.subjects[1].seg.path
    img = nib.load(bad)
    data = np.asarray(img.dataobj).astype(np.int16)
    data[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(data, img.affine), bad)
    with pytest.raises(InputError, match="segmentation labels") as err:
        embed_cohort(model, cohort, preprocessing, check_seg=True, **kw)
    assert str(bad) in str(err.value)


def test_cached_items_through_dataloader_workers_give_the_same_vectors(
    model, cohorts, preprocessing, tmp_path
):
    """Cached entries (with their evaluation grid) cross a worker process and give the vectors
    of freshly preprocessed subjects encoded in this process."""
    cohort = cohorts["siteA"]
    kw = dict(features="latent", progress=False)
    fresh = embed_cohort(model, cohort, preprocessing, **kw)
    cached = dict(preprocessed_dir=tmp_path / "pre", **kw)
    embed_cohort(model, cohort, preprocessing, **cached)
    again = embed_cohort(model, cohort, preprocessing, num_workers=1, **cached)
    assert "cache_read" in again.timings and "decode" not in again.timings
    np.testing.assert_array_equal(again.vectors, fresh.vectors)
    np.testing.assert_array_equal(again.n_patches, fresh.n_patches)


def test_no_flipped_byte_anywhere_in_an_entry_is_served_or_raises(cohorts, preprocessing, tmp_path):
    """Flip one byte at positions spread over a whole entry (tables, npy headers, data): the
    entry is either refused (deleted, a miss) or, where the byte was inert (header padding),
    served unchanged; a read never raises."""
    ds = PreprocessedSubjects(cohorts["siteA"].subjects, preprocessing, quality=True)
    item = ds.compute(cohorts["siteA"].subjects[0])
    cache = PreprocessedCache(tmp_path / "c")
    cache.put("k", item)
    intact = cache.path("k").read_bytes()
    refused = 0
    for at in range(0, len(intact), max(1, len(intact) // 97)):
        data = bytearray(intact)
        data[at] ^= 0x5A
        cache.path("k").write_bytes(bytes(data))
        back = cache.get("k")
        if back is None:
            refused += 1
            assert not cache.path("k").exists()
            continue
        for k in ("image", "brain", "positions", "affine"):
            assert torch.equal(
                torch.as_tensor(back[k]), torch.as_tensor(item[k]).as_subclass(torch.Tensor)
            ), at
        np.testing.assert_array_equal(back["quality"], item["quality"])
        assert back["subject_id"] == item["subject_id"]
    assert refused >= 90
