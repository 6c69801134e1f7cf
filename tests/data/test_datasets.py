"""Tests of the dataset stage: cache equivalence (memory, disk, none), disk-cache keys, seeded
training patches independent of workers, batch collation and error reporting."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nifti_factory import brats_id, write_brats_cohort
from torch.utils.data import DataLoader

from aad_med import CHANNELS
from aad_med.data.datasets import (
    PatchDataset,
    build_eval_dataset,
    build_train_dataset,
    record_hash,
    train_collate,
)
from aad_med.data.patches import DEFAULT_AUGMENT, SAMPLING_KEYS
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import ImageSource, SubjectRecord
from aad_med.data.transforms import PREPROCESSED_KEYS
from aad_med.errors import ConfigError, InputError

CFG = PreprocessingConfig(patch_size=8, min_brain_fraction=0.4)


def records_of(root: Path, n: int, without_seg: tuple[int, ...] = ()) -> list[SubjectRecord]:
    out = []
    for i in range(n):
        sid = brats_id("brats2021", i)
        folder = root / sid
        images = {ch: ImageSource(folder / f"{sid}_{ch}.nii.gz") for ch in CHANNELS}
        seg = None if i in without_seg else ImageSource(folder / f"{sid}_seg.nii.gz")
        out.append(SubjectRecord(sid, images, seg))
    return out


@pytest.fixture
def records(tmp_path) -> list[SubjectRecord]:
    write_brats_cohort(tmp_path / "cohort", n=3)
    return records_of(tmp_path / "cohort", 3, without_seg=(2,))


def assert_same_item(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert type(b[key]) is torch.Tensor and b[key].dtype == value.dtype, key
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_cache_modes_give_identical_preprocessed_subjects(records, tmp_path):
    cache_dir = tmp_path / "cache"
    datasets = {
        "none": build_eval_dataset(records, CFG, cache="none"),
        "memory": build_eval_dataset(records, CFG, cache="memory"),
        "disk": build_eval_dataset(records, CFG, cache="disk", cache_dir=cache_dir),
    }
    written = build_eval_dataset(records, CFG, cache="disk", cache_dir=cache_dir)
    for i in range(len(records)):
        ref = datasets["none"][i]
        assert set(ref) == set(PREPROCESSED_KEYS)
        assert ref["subject_id"] == records[i].subject_id
        assert ref["has_seg"] is (records[i].seg is not None)
        for name in ("memory", "disk"):
            assert_same_item(ref, datasets[name][i])
        # A second disk dataset reads the cached file back (weights_only) and gets the same item.
        assert_same_item(ref, written[i])
    assert len(list(cache_dir.glob("*.pt"))) == len(records)


def test_disk_cache_key_follows_config_and_files(records, tmp_path):
    cache_dir = tmp_path / "cache"
    ds = build_eval_dataset(records[:1], CFG, cache="disk", cache_dir=cache_dir)
    _ = ds[0]
    other = PreprocessingConfig(patch_size=12, min_brain_fraction=0.4)
    ds2 = build_eval_dataset(records[:1], other, cache="disk", cache_dir=cache_dir)
    _ = ds2[0]
    assert len(list(cache_dir.glob("*.pt"))) == 2

    item = records[0].as_dict()
    before = record_hash(item, "cfg")
    assert record_hash(item, "cfg") == before
    assert record_hash(item, "other cfg") != before
    assert record_hash(item, "cfg", "sampling_index") != before
    path = records[0].images["t1"].path
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert record_hash(item, "cfg") != before


def test_train_dataset_items_and_collate(records):
    ds = build_train_dataset(records, CFG, samples_per_subject=4, cache="memory", seed=0)
    assert isinstance(ds, PatchDataset) and len(ds) == 3
    item = ds[0]
    assert isinstance(item, list) and len(item) == 4
    batch = train_collate([ds[0], ds[2]])
    assert batch["image"].shape == (8, 4, 8, 8, 8) and batch["image"].dtype == torch.float32
    assert type(batch["image"]) is torch.Tensor
    assert batch["seg"].shape == (8, 1, 8, 8, 8) and batch["seg"].dtype == torch.int16
    assert batch["brain"].shape == (8, 1, 8, 8, 8) and batch["brain"].dtype == torch.uint8
    assert batch["patch_start"].shape == (8, 3) and batch["patch_start"].dtype == torch.int64
    assert batch["has_seg"].tolist() == [True] * 4 + [False] * 4
    assert batch["subject_id"] == [records[0].subject_id] * 4 + [records[2].subject_id] * 4
    assert not batch["patch_tumour"][4:].any()
    fractions = batch["brain"].float().mean(dim=(1, 2, 3, 4))
    assert torch.all(fractions >= CFG.min_brain_fraction)


def _epoch_images(ds, num_workers: int = 0) -> torch.Tensor:
    loader = DataLoader(
        ds, batch_size=2, shuffle=False, num_workers=num_workers, collate_fn=train_collate
    )
    return torch.cat([b["image"] for b in loader])


def test_train_dataset_is_seeded_and_worker_independent(records, tmp_path):
    kw = {"samples_per_subject": 3, "augment": DEFAULT_AUGMENT}
    a = build_train_dataset(records, CFG, cache="memory", seed=7, **kw)
    b = build_train_dataset(records, CFG, cache="disk", cache_dir=tmp_path / "c", seed=7, **kw)
    c = build_train_dataset(records, CFG, cache="none", seed=8, **kw)
    first = _epoch_images(a)
    assert torch.equal(first, _epoch_images(a))
    assert torch.equal(first, _epoch_images(b, num_workers=2))
    assert not torch.equal(first, _epoch_images(c))
    c.set_random_state(7)
    assert torch.equal(first, _epoch_images(c))
    a.set_epoch(1)
    assert not torch.equal(first, _epoch_images(a))
    # Access order does not matter: subject 2 alone gives its patches of the full pass.
    a.set_epoch(0)
    assert torch.equal(train_collate([a[2]])["image"], first[6:9])


def test_eval_dataset_shapes_cover_patch_size(records):
    cfg = PreprocessingConfig(patch_size=24)
    ds = build_eval_dataset(records, cfg)
    for i in range(len(ds)):
        d = ds[i]
        assert d["image"].shape[0] == 4 and min(d["image"].shape[1:]) >= 24
        assert d["image"].shape[1:] == d["brain"].shape[1:] == d["seg"].shape[1:]


def test_bad_files_raise_input_error(records):
    records[1].images["flair"].path.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="_flair.nii.gz"):
        build_eval_dataset(records, CFG, cache="memory")
    lazy = build_eval_dataset(records, CFG, cache="none")
    _ = lazy[0]
    with pytest.raises(InputError, match="_flair.nii.gz"):
        _ = lazy[1]
    train = build_train_dataset(records, CFG, samples_per_subject=2, cache="none")
    with pytest.raises(InputError, match="_flair.nii.gz"):
        _ = train[1]


def test_bad_cache_arguments(records):
    with pytest.raises(ConfigError, match="unknown cache"):
        build_eval_dataset(records, CFG, cache="ram")
    with pytest.raises(ConfigError, match="cache_dir"):
        build_train_dataset(records, CFG, cache="disk")


def test_records_as_dicts_are_accepted(records):
    a = build_eval_dataset(records, CFG)[0]
    b = build_eval_dataset([r.as_dict() for r in records], CFG)[0]
    assert_same_item(a, b)


def test_input_error_survives_dataloader_workers(records):
    # One loader only: a DataLoader left by an exception takes ~5 s to reap its worker.
    records[2].images["t2"].path.unlink()
    ds = build_eval_dataset(records, CFG, cache="none")
    with pytest.raises(InputError) as info:
        list(DataLoader(ds, batch_size=None, num_workers=1))
    assert str(info.value) == f"{records[2].images['t2'].path}: file does not exist"
    assert type(info.value).__name__ == "WorkerInputError"
    # Reap the worker here (the traceback holds the loader) rather than in a later test.
    del info
    gc.collect()


def test_memory_cache_failure_exits_cleanly(records, tmp_path):
    # MONAI's own cache pool abandoned running threads on failure and aborted at exit (rc 134).
    records[0].images["t1"].path.write_bytes(b"\x1f\x8b broken gzip")
    script = tmp_path / "build.py"
    script.write_text(
        "import json, sys\n"
        "from aad_med.data.datasets import build_train_dataset\n"
        "from aad_med.data.preprocessing import PreprocessingConfig\n"
        "from aad_med.errors import InputError\n"
        "recs = json.loads(sys.argv[1])\n"
        "try:\n"
        "    build_train_dataset(recs, PreprocessingConfig(patch_size=8), cache='memory',"
        " num_workers=3)\n"
        "except InputError as e:\n"
        "    print('ERROR', e)\n"
    )
    arg = json.dumps([r.as_dict() for r in records])
    proc = subprocess.run(
        [sys.executable, str(script), arg], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"ERROR {records[0].images['t1'].path}: ")


def test_items_are_copies_of_the_memory_cache(records):
    ds = build_eval_dataset(records, CFG, cache="memory")
    item = ds[0]
    item["image"] = torch.zeros(1)
    assert ds[0]["image"].shape[0] == 4


def test_training_cache_holds_the_sampler_tables(records, tmp_path):
    """Training items carry the patch sampler's tables; evaluation items and keys do not."""
    cache_dir = tmp_path / "cache"
    ev = build_eval_dataset(records, CFG, cache="disk", cache_dir=cache_dir)
    for cache in ("memory", "disk", "none"):
        tr = build_train_dataset(records, CFG, cache=cache, cache_dir=cache_dir, seed=0)
        for i in range(len(records)):
            item = tr.subjects[i]
            assert set(item) == set(PREPROCESSED_KEYS) | set(SAMPLING_KEYS), cache
            assert (item["tumour_index"].numel() > 0) is (records[i].seg is not None)
    for i in range(len(records)):
        assert set(ev[i]) == set(PREPROCESSED_KEYS)
    # One entry per subject for each variant: evaluation and training entries never collide.
    assert len(list(cache_dir.glob("*.pt"))) == 2 * len(records)
