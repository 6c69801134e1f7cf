"""Embedding beyond one process: round-robin shards put back in subject order, regional sums
merged, and ``torchrun`` with 2 gloo processes on CPU writing the same ``embeddings.csv`` as one
process (a cohort smaller than the world size included); an error on the ranks is reported once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from checkpoint_factory import write_tiny_checkpoint

from aad_med.embedding import embed_cohorts
from aad_med.embedding.distributed import (
    embed_cohorts_distributed,
    merge_regional,
    merge_shards,
    shard_indices,
)
from aad_med.embedding.encode import CohortEmbedding
from aad_med.embedding.regional import RegionalLatents
from tests.nifti_factory import write_brats_cohort

REPO = Path(__file__).resolve().parents[2]


def _emb(name: str, ids: list[int], dim: int = 3) -> CohortEmbedding:
    return CohortEmbedding(
        name=name,
        subject_ids=[f"s{i}" for i in ids],
        paths=[f"/data/s{i}" for i in ids],
        n_patches=np.array(ids, dtype=np.int64) + 10,
        vectors=np.array([[i, i + 0.5, -i] for i in ids], dtype=np.float64)[:, :dim],
        latent_means=np.array([[i, i + 0.5, -i] for i in ids], dtype=np.float64)[:, :dim],
    )


@pytest.mark.parametrize("n,world", [(7, 2), (5, 3), (1, 2), (0, 4), (9, 1)])
def test_shards_cover_every_subject_once(n, world):
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_indices_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        shard_indices(5, 2, 2)


def test_merge_restores_subject_order_with_an_empty_shard():
    # 2 subjects over 3 ranks: rank 2 encoded nothing.
    merged = merge_shards([_emb("a", [0]), _emb("a", [1]), None], "a", 2)
    assert merged.subject_ids == ["s0", "s1"]
    # 7 subjects over 3 ranks: rank r holds r, r+3, r+6.
    parts = [_emb("a", shard_indices(7, r, 3)) for r in range(3)]
    merged = merge_shards(parts, "a", 7)
    assert merged.subject_ids == [f"s{i}" for i in range(7)]
    assert merged.paths == [f"/data/s{i}" for i in range(7)]
    np.testing.assert_array_equal(merged.n_patches, np.arange(7) + 10)
    np.testing.assert_array_equal(merged.vectors[:, 0], np.arange(7))
    np.testing.assert_array_equal(merged.latent_means[:, 2], -np.arange(7))


def test_merge_refuses_shards_that_do_not_add_up():
    with pytest.raises(ValueError, match="shards hold"):
        merge_shards([_emb("a", [0, 2]), _emb("a", [1])], "a", 4)


def test_a_gathered_error_is_raised_by_rank_zero_only():
    from aad_med.embedding.distributed import ReportedOnRankZero, _raise_first_error
    from aad_med.errors import InputError

    bad = InputError("/data/s3/t1.nii.gz", "truncated gzip stream")
    outcomes = [("ok", {}), ("error", bad), ("ok", {})]
    with pytest.raises(InputError) as raised:
        _raise_first_error(outcomes, rank=0)
    assert raised.value is bad
    for rank in (1, 2):
        with pytest.raises(ReportedOnRankZero, match="truncated gzip stream"):
            _raise_first_error(outcomes, rank=rank)
    _raise_first_error([("ok", {}), ("ok", {})], rank=1)


def _regional(cells, sums, counts, image_value, n_images, shape=(4, 4, 4)) -> RegionalLatents:
    return RegionalLatents(
        cell_size=8,
        patch_size=8,
        cells=np.array(cells, dtype=np.int64).reshape(-1, 3),
        sums=np.array(sums, dtype=np.float64),
        counts=np.array(counts, dtype=np.int64),
        image_sum=np.full(shape, float(image_value)),
        n_images=n_images,
        ras_shape=shape,
        ras_affine=np.eye(4),
        same_space=True,
    )


def test_merge_regional_adds_cells_counts_and_images():
    a = _regional([[0, 0, 0], [1, 0, 0]], [[1.0, 2.0], [3.0, 4.0]], [2, 1], 1.5, 2)
    b = _regional([[1, 0, 0], [0, 1, 0]], [[10.0, 20.0], [5.0, 6.0]], [1, 1], 2.0, 1)
    m = merge_regional([a, b])
    assert [tuple(c) for c in m.cells] == [(0, 0, 0), (0, 1, 0), (1, 0, 0)]
    np.testing.assert_array_equal(m.sums, [[1.0, 2.0], [5.0, 6.0], [13.0, 24.0]])
    np.testing.assert_array_equal(m.counts, [2, 1, 2])
    np.testing.assert_array_equal(m.image_sum, np.full((4, 4, 4), 3.5))
    assert m.n_images == 3 and m.same_space
    other = _regional([[0, 0, 0]], [[1.0, 1.0]], [1], 1.0, 1, shape=(5, 4, 4))
    assert not merge_regional([a, other]).same_space


def test_without_a_process_group_it_is_embed_cohorts(cohorts, model, preprocessing):
    got = embed_cohorts_distributed(model, cohorts, preprocessing, device="cpu", progress=False)
    want = embed_cohorts(model, cohorts, preprocessing, device="cpu", progress=False)
    assert list(got) == list(want)
    for name in want:
        assert got[name].subject_ids == want[name].subject_ids
        np.testing.assert_array_equal(got[name].vectors, want[name].vectors)


# -- torchrun ----------------------------------------------------------------------------------


def _run(args: list[str], nproc: int | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Same thread count in both runs: convolution results may depend on it.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd += ["-m", "aad_med.cli.embed"]
    else:
        cmd += ["-m", "aad_med.cli.embed"]
    return subprocess.run(
        cmd + args + ["--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


@pytest.fixture
def two_cohorts(tmp_path):
    # 5 subjects: unequal shards (3 + 2); 1 subject: rank 1 has nothing to encode.
    a = write_brats_cohort(tmp_path / "siteA", n=5)
    b = write_brats_cohort(tmp_path / "siteB", n=1, scale=1.5)
    return [f"--cohort=siteA={a}", f"--cohort=siteB={b}"]


@pytest.mark.slow
def test_two_gloo_processes_write_the_same_csv_as_one(tmp_path, two_cohorts):
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.pt", latent_dim=6)
    one = _run(["--checkpoint", str(ckpt), *two_cohorts, "--out", str(tmp_path / "one")], None)
    assert one.returncode == 0, one.stderr
    two = _run(["--checkpoint", str(ckpt), *two_cohorts, "--out", str(tmp_path / "two")], 2)
    assert two.returncode == 0, two.stderr
    assert "encoded by 2 process(es)" in two.stdout
    csv_one = (tmp_path / "one" / "embeddings.csv").read_text()
    csv_two = (tmp_path / "two" / "embeddings.csv").read_text()
    rows = csv_one.splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("subject_id,cohort,path,n_patches,z0")
    assert [r.split(",")[0] for r in rows[1:]] == [f"BraTS2021_{i:05d}" for i in range(5)] + [
        "BraTS2021_00000"
    ]
    assert csv_two == csv_one
    # Rank 1 wrote nothing: one summary line, from rank 0.
    assert two.stdout.count("aad-embed:") == 1


@pytest.mark.slow
def test_an_error_on_every_rank_is_reported_once(tmp_path, two_cohorts):
    ckpt = write_tiny_checkpoint(tmp_path / "bad.pt", latent_dim=6, model_patch=16)
    two = _run(["--checkpoint", str(ckpt), *two_cohorts, "--out", str(tmp_path / "two")], 2)
    assert two.returncode != 0
    errors = [ln for ln in two.stderr.splitlines() if ln.startswith("aad-embed: error:")]
    assert len(errors) == 1, two.stderr
    assert "16-voxel patches" in errors[0] and "8-voxel" in errors[0]
    assert not (tmp_path / "two" / "embeddings.csv").exists()
