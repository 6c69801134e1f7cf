"""Caches that heal (issue 13, items 1 and 2): a corrupt embedding ``.npz`` or intensity ``.npy``
entry is a CacheWarning, deleted and recomputed, never a failure or blamed on the cohort; an
unwritable cache folder means running uncached; content edits that keep size and mtime are seen."""

from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest

from aad_med.data.datasets import record_hash
from aad_med.data.intensity import cached_fingerprint, intensity_fingerprint
from aad_med.data.validation import load_cohort
from aad_med.embedding.cache import embed_cohorts, load_cached
from aad_med.embedding.encode import EmbedSettings
from aad_med.io_utils import CacheWarning, file_stats
from tests.nifti_factory import brain_like, write_brats_cohort, write_nifti


def _settings(cache):
    return EmbedSettings(checkpoint_hash="0" * 64, cache_dir=cache, batch_size=4)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _flip(p):
    raw = bytearray(p.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))


def _wrong_shape_npz(p):
    with np.load(p, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["vectors"] = arrays["vectors"][:, :1][:-1]
    with open(p, "wb") as f:
        np.savez(f, **arrays)


def _other_subjects_npz(p):
    with np.load(p, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    arrays["subject_ids"] = np.array([f"x{i}" for i in range(len(arrays["subject_ids"]))])
    with open(p, "wb") as f:
        np.savez(f, **arrays)


def _pickle_npz(p):
    with open(p, "wb") as f:
        np.savez(f, vectors=np.array([object()], dtype=object))


def _a_folder(p):
    p.unlink()
    p.mkdir()


CORRUPTIONS = [_truncate, _empty, _flip, _wrong_shape_npz, _other_subjects_npz, _pickle_npz]


@pytest.mark.parametrize("corrupt", CORRUPTIONS + [_a_folder], ids=lambda f: f.__name__[1:])
def test_corrupt_embedding_entry_is_recomputed(corrupt, model, cohorts, preprocessing, tmp_path):
    cache = tmp_path / "cache"
    one = {"siteA": cohorts["siteA"]}
    first = embed_cohorts(model, one, preprocessing, _settings(cache))["siteA"]
    (entry,) = cache.glob("*.npz")
    corrupt(entry)
    with pytest.warns(CacheWarning, match="unusable embedding cache entry"):
        again = embed_cohorts(model, one, preprocessing, _settings(cache))["siteA"]
    np.testing.assert_allclose(again.vectors, first.vectors)
    assert again.subject_ids == first.subject_ids
    # Healed: the rewritten entry is read back without a warning.
    assert load_cached(entry, cohorts["siteA"], first.features) is not None


def test_unwritable_embedding_cache_runs_uncached(model, cohorts, preprocessing, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    one = {"siteB": cohorts["siteB"]}
    with pytest.warns(CacheWarning, match="cannot write the embedding cache"):
        out = embed_cohorts(model, one, preprocessing, _settings(blocker / "sub"))["siteB"]
    plain = embed_cohorts(model, one, preprocessing, EmbedSettings(batch_size=4))["siteB"]
    np.testing.assert_allclose(out.vectors, plain.vectors)
    assert blocker.read_text().startswith("a file")


@pytest.fixture(scope="module")
def intensity_cohort(tmp_path_factory):
    return load_cohort(write_brats_cohort(tmp_path_factory.mktemp("fp") / "a", n=3))


def _wrong_shape_fp(p):
    with open(p, "wb") as f:
        np.savez(f, fingerprint=np.ones((1, 28)))


def _nan_fp(p):
    arr = np.load(p)["fingerprint"]
    arr[0, 0] = np.nan
    with open(p, "wb") as f:
        np.savez(f, fingerprint=arr)


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _empty, _flip, _wrong_shape_fp, _nan_fp, _pickle_npz, _a_folder],
    ids=lambda f: f.__name__[1:],
)
def test_corrupt_intensity_entry_is_recomputed(corrupt, intensity_cohort, tmp_path):
    cache = tmp_path / "cache"
    first = cached_fingerprint(intensity_cohort, cache)
    (entry,) = cache.glob("intensity-*.npz")
    corrupt(entry)
    with pytest.warns(CacheWarning, match="unusable intensity cache entry"):
        again = cached_fingerprint(intensity_cohort, cache)
    np.testing.assert_array_equal(again, first)
    assert again.shape == (3, 28)
    np.testing.assert_array_equal(np.load(entry)["fingerprint"], first)


def test_read_only_intensity_cache_runs_uncached(intensity_cohort, tmp_path, monkeypatch):
    # The kernel refuses the write as it would in a read-only folder (chmod alone does not stop
    # root, which runs these tests; the CLI read-only test drops root's override instead).
    import builtins

    cache = tmp_path / "ro"
    cache.mkdir()
    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).startswith(str(cache)):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.warns(CacheWarning, match="cannot write the intensity cache"):
        out = cached_fingerprint(intensity_cohort, cache)
    monkeypatch.undo()
    assert not list(cache.iterdir()), "no entry or temporary file is left"
    np.testing.assert_array_equal(out, intensity_fingerprint(intensity_cohort.subjects))


def test_disk_full_cache_runs_uncached(intensity_cohort, tmp_path, monkeypatch):
    """ENOSPC in the middle of a cache write: a warning, no partial or temporary file."""
    import errno

    real_save = np.save  # writes part of the entry before the disk fills

    def full(f, arr, allow_pickle=False):
        real_save(f, arr[:1], allow_pickle=allow_pickle)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", lambda f, fingerprint: full(f, fingerprint))
    cache = tmp_path / "cache"
    with pytest.warns(CacheWarning, match="No space left on device"):
        out = cached_fingerprint(intensity_cohort, cache)
    monkeypatch.undo()
    np.testing.assert_array_equal(out, intensity_fingerprint(intensity_cohort.subjects))
    assert list(cache.iterdir()) == []


def _same_size_other_bytes(path):
    """Replace a scan by other content of the same byte size and restore its mtime, as
    ``cp -p`` / ``rsync -t`` do; returns whether the sizes matched."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    tmp = path.with_name("other.nii")
    write_nifti(tmp, brain_like(seed=123, scale=3.0).astype(np.float32))
    other = tmp.read_bytes()
    tmp.unlink()
    assert path.suffix == ".nii" and len(other) == len(raw)
    path.write_bytes(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture
def plain_cohort(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(3):
        sid = f"BraTS2021_{i:05d}"
        (root / sid).mkdir()
        for j, ch in enumerate(("t1", "t1ce", "t2", "flair")):
            data = brain_like(seed=i * 10 + j).astype(np.float32)
            write_nifti(root / sid / f"{sid}_{ch}.nii", data)
    return root


def test_same_size_same_mtime_content_change_is_not_served_stale(
    model, preprocessing, plain_cohort, tmp_path
):
    cache = tmp_path / "cache"
    coh = {"a": load_cohort(plain_cohort)}
    before = embed_cohorts(model, coh, preprocessing, _settings(cache))["a"]
    fp_before = cached_fingerprint(coh["a"], cache)
    key_before = file_stats(coh["a"].subjects[0].files)
    item = coh["a"].subjects[0].as_dict()
    train_key_before = record_hash(item, "{}")

    _same_size_other_bytes(next(plain_cohort.glob("*_00000/*_t1.nii")))
    coh = {"a": load_cohort(plain_cohort)}
    assert file_stats(coh["a"].subjects[0].files) != key_before
    assert record_hash(item, "{}") != train_key_before
    after = embed_cohorts(model, coh, preprocessing, _settings(cache))["a"]
    fresh = embed_cohorts(model, coh, preprocessing, EmbedSettings(batch_size=4))["a"]
    np.testing.assert_allclose(after.latent_means, fresh.latent_means)
    assert not np.allclose(after.latent_means[0], before.latent_means[0])
    fp_after = cached_fingerprint(coh["a"], cache)
    np.testing.assert_array_equal(fp_after, intensity_fingerprint(coh["a"].subjects))
    assert not np.array_equal(fp_after[0], fp_before[0])
    assert len(list(cache.glob("[0-9a-f]*.npz"))) == 2


def test_corrupt_npz_is_a_zip_error_before_healing(tmp_path):
    """What the healing covers: numpy itself raises on these entries."""
    p = tmp_path / "x.npz"
    with open(p, "wb") as f:
        np.savez(f, a=np.ones(3))
    _truncate(p)
    with pytest.raises((zipfile.BadZipFile, OSError, ValueError, EOFError)):
        np.load(p, allow_pickle=False)["a"]
