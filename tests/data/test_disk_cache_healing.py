"""The ``data.cache=disk`` cache heals: a truncated, emptied, byte-flipped, wrong-shaped or
pickle-payload entry is a CacheWarning, deleted and recomputed (never a torch RuntimeError), and
an unusable cache folder means running uncached with a warning."""

from __future__ import annotations

import builtins

import pytest
import torch

from aad_med.data.datasets import CacheWarning, build_eval_dataset, build_train_dataset
from aad_med.data.layouts import discover_cohort
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.pipelines.train import train_from_config
from aad_med.training.checkpoint import load_checkpoint
from tests.nifti_factory import write_brats_cohort
from tests.training.conftest import compose_train, tiny_overrides

CFG = PreprocessingConfig(patch_size=8, min_brain_fraction=0.4)


@pytest.fixture
def records(tmp_path):
    return discover_cohort(write_brats_cohort(tmp_path / "cohort", n=2)).subjects


class _Payload:
    def __reduce__(self):
        return (builtins.print, ("payload ran",))


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _flip(p):
    raw = bytearray(p.read_bytes())
    for i in range(0, len(raw), 97):
        raw[i] ^= 0xFF
    p.write_bytes(bytes(raw))


def _wrong_shape(p):
    item = torch.load(p, weights_only=True)
    item["image"] = item["image"][:1]
    torch.save(item, p)


def _not_a_dict(p):
    torch.save([1, 2, 3], p)


def _pickle_payload(p):
    torch.save({"image": _Payload()}, p)


@pytest.mark.parametrize(
    "damage", [_truncate, _empty, _flip, _wrong_shape, _not_a_dict, _pickle_payload]
)
def test_damaged_entry_is_recomputed_with_a_warning(records, tmp_path, damage, capfd):
    cache = tmp_path / "cache"
    first = build_eval_dataset(records, CFG, cache="disk", cache_dir=cache)
    ref = first[0]
    (entry,) = [
        p
        for p in cache.glob("*.pt")
        if torch.load(p, weights_only=True)["subject_id"] == ref["subject_id"]
    ]
    damage(entry)
    again = build_eval_dataset(records, CFG, cache="disk", cache_dir=cache)
    with pytest.warns(CacheWarning, match=r"corrupt disk-cache entry.*recomputing") as w:
        item = again[0]
    assert str(entry) in str(w[0].message)
    assert torch.equal(item["image"], ref["image"]) and item["subject_id"] == ref["subject_id"]
    # Healed on disk: the entry loads again (weights_only) and holds the subject.
    assert torch.equal(torch.load(entry, weights_only=True)["image"], ref["image"])
    assert "payload ran" not in capfd.readouterr().out


def test_cache_folder_that_is_a_file_runs_uncached(records, tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    with pytest.warns(CacheWarning, match=r"exists and is not a folder; running without"):
        ds = build_train_dataset(records, CFG, cache="disk", cache_dir=blocker, seed=1)
    assert len(ds[0]) == 8 and blocker.read_text() == "not a folder"


def test_read_only_cache_folder_runs_uncached(records, tmp_path, monkeypatch):
    # The folder refuses new files as a read-only one would (chmod alone does not stop root,
    # which runs these tests).
    import tempfile

    cache = tmp_path / "cache"
    cache.mkdir()
    real = tempfile.NamedTemporaryFile

    def refusing(*args, **kwargs):
        if str(kwargs.get("dir", "")) == str(cache):
            raise PermissionError(13, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refusing)
    with pytest.warns(CacheWarning, match="not writable"):
        ds = build_eval_dataset(records, CFG, cache="disk", cache_dir=cache)
    assert ds[0]["image"].ndim == 4
    assert not list(cache.iterdir()), "nothing is cached in a folder that refuses files"


def test_failed_write_is_a_warning_and_the_item_is_still_served(records, tmp_path, monkeypatch):
    ds = build_eval_dataset(records, CFG, cache="disk", cache_dir=tmp_path / "cache")

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.warns(CacheWarning, match="No space left on device"):
        item = ds[0]
    assert item["image"].shape[0] == 4
    assert not list((tmp_path / "cache").iterdir()), "no partial entry or temp file is left"


def test_aad_train_heals_a_truncated_disk_cache(tmp_path):
    cohort = write_brats_cohort(tmp_path / "cohort", n=5)
    cache = tmp_path / "cache"
    over = tiny_overrides(
        cohort, tmp_path, **{"trainer.max_epochs": 1, "data.cache": "disk", "data.cache_dir": cache}
    )
    train_from_config(compose_train(over), tmp_path / "run1")
    entries = sorted(cache.glob("*.pt"))
    assert entries
    for p in entries:
        _truncate(p)
    with pytest.warns(CacheWarning, match="corrupt disk-cache entry"):
        result = train_from_config(compose_train(over), tmp_path / "run2")
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 1
    assert all(torch.load(p, weights_only=True)["image"].ndim == 4 for p in entries)
