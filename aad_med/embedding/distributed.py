"""Stage 4, embedding beyond one process: under ``torchrun --nproc_per_node=N`` every rank
encodes a shard of each cohort's subjects (subjects ``rank, rank + N, rank + 2N, ...``), and the
vectors are gathered with ``torch.distributed.all_gather_object`` (gloo on CPU, nccl on CUDA) and
put back in the original subject order. Every rank returns the same result; rank 0 alone writes
the embedding cache and, from the command line, ``embeddings.csv``.

Without torchrun (or with one process) it is exactly
:func:`aad_med.embedding.cache.embed_cohorts`. Each subject is encoded alone (its own patch
batches), so the vectors do not depend on how subjects are sharded: with the same device type and
thread settings, N processes write the same ``embeddings.csv`` as one. Regional sums are added in
another order and agree to rounding only.

The command line is ``aad-embed`` (:mod:`aad_med.cli.embed`, body in
:mod:`aad_med.pipelines.embed`); this module holds only the sharding.

Computes no statistics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import Cohort
from aad_med.device import resolve_device
from aad_med.embedding.cache import (
    cache_entry,
    finalize_vectors,
    load_cached,
    save_cached,
)
from aad_med.embedding.cache import embed_cohorts as embed_cohorts_single
from aad_med.embedding.encode import CohortEmbedding, EmbedSettings, embed_cohort
from aad_med.embedding.features import get_feature_set
from aad_med.embedding.preprocessed import usable
from aad_med.embedding.regional import AFFINE_TOLERANCE, RegionalLatents
from aad_med.errors import AADError

__all__ = [
    "embed_cohorts_distributed",
    "merge_regional",
    "merge_shards",
    "shard_indices",
]

#: Ranks wait at the gather for the slowest shard; a CPU cohort can take hours.
DEFAULT_TIMEOUT_S = 6 * 3600.0

log = logging.getLogger(__name__)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Subjects encoded by ``rank``: ``rank, rank + world_size, ...`` (round robin, so shards
    differ in size by at most one and each holds subjects from the whole cohort)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    return list(range(rank, int(n), world_size))


def merge_regional(parts: Sequence[RegionalLatents]) -> RegionalLatents | None:
    """Sum shards' regional latents (cells, subject counts, image sums) into one cohort's.

    Returns:
        The merged :class:`RegionalLatents`; ``None`` when ``parts`` is empty. ``same_space`` is
        false when any shard saw several image spaces or the shards' spaces differ.
    """
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    used = [p for p in parts if p.n_images > 0] or parts[:1]
    ref = used[0]
    same = all(p.same_space for p in parts) and all(
        tuple(p.ras_shape) == tuple(ref.ras_shape)
        and np.allclose(p.ras_affine, ref.ras_affine, atol=AFFINE_TOLERANCE)
        for p in used
    )
    dim = next((p.sums.shape[1] for p in used if p.sums.ndim == 2), 0)
    sums: dict[tuple[int, int, int], np.ndarray] = {}
    counts: dict[tuple[int, int, int], int] = {}
    for p in used:
        for c, s, k in zip(p.cells.tolist(), p.sums, p.counts, strict=True):
            key = tuple(int(v) for v in c)
            if key in sums:
                sums[key] = sums[key] + s
                counts[key] += int(k)
            else:
                sums[key] = np.array(s, dtype=np.float64)
                counts[key] = int(k)
    keys = sorted(sums)
    image_sum = ref.image_sum.copy()
    if same:
        for p in used[1:]:
            image_sum += p.image_sum
    return RegionalLatents(
        cell_size=ref.cell_size,
        patch_size=ref.patch_size,
        cells=np.array(keys, dtype=np.int64).reshape(-1, 3),
        sums=np.array([sums[k] for k in keys], dtype=np.float64).reshape(-1, dim),
        counts=np.array([counts[k] for k in keys], dtype=np.int64),
        image_sum=image_sum,
        n_images=int(sum(p.n_images for p in used)),
        ras_shape=tuple(ref.ras_shape),
        ras_affine=ref.ras_affine,
        same_space=bool(same),
    )


def merge_shards(
    parts: Sequence[CohortEmbedding | None], name: str, n_subjects: int
) -> CohortEmbedding:
    """One cohort's embedding from its round-robin shards, in the original subject order.

    Args:
        parts: ``parts[r]`` holds subjects ``r, r + W, ...`` (``W = len(parts)``); ``None`` for a
            rank whose shard was empty.
        name: the cohort name.
        n_subjects: subjects in the cohort.

    Raises:
        ValueError: the shards do not hold exactly ``n_subjects`` subjects in round-robin order.
    """
    world = len(parts)
    sizes = [len(shard_indices(n_subjects, r, world)) for r in range(world)]
    got = [0 if p is None else len(p) for p in parts]
    if got != sizes:
        raise ValueError(f"cohort {name}: shards hold {got} subjects, expected {sizes}")
    present = [p for p in parts if p is not None and len(p)]
    if not present:
        raise ValueError(f"cohort {name}: no subjects were encoded")
    order = [(i % world, i // world) for i in range(n_subjects)]

    def pick(attr: str) -> list:
        return [getattr(parts[r], attr)[j] for r, j in order]

    regional = None
    if any(p.regional is not None for p in present):
        regional = merge_regional([p.regional for p in present])
    return CohortEmbedding(
        name=name,
        subject_ids=[str(s) for s in pick("subject_ids")],
        paths=[str(s) for s in pick("paths")],
        n_patches=np.asarray(pick("n_patches"), dtype=np.int64),
        vectors=np.stack(pick("vectors")).astype(np.float64),
        latent_means=np.stack(pick("latent_means")).astype(np.float64),
        features=present[0].features,
        regional=regional,
        fingerprints=(
            np.stack(pick("fingerprints"))
            if all(p.fingerprints is not None for p in present)
            else None
        ),
        quality=(
            np.stack(pick("quality")) if all(p.quality is not None for p in present) else None
        ),
        seg_checked=all(p.seg_checked for p in present),
        # Seconds summed over the ranks (CPU time of each phase, not wall time).
        timings={
            k: sum(p.timings.get(k, 0.0) for p in present) for p in present for k in p.timings
        },
    )


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (one pickled broadcast)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ReportedOnRankZero(AADError):
    """A failure gathered from another rank; rank 0 reports it, the others exit quietly."""


def _raise_first_error(outcomes: Sequence[tuple[str, Any]], rank: int) -> None:
    """Raise the lowest rank's error on rank 0 and a quiet stand-in on the others, so a
    failure is reported once whichever rank hit it; no-op when every rank succeeded."""
    for kind, value in outcomes:
        if kind == "error":
            if rank == 0:
                raise value
            raise ReportedOnRankZero(str(value))


def on_every_rank(fn: Callable[[], Any]) -> Any:
    """``fn()`` on every rank; when it fails with an :class:`AADError` on any rank, every rank
    raises (see :func:`_raise_first_error`) instead of the others waiting in the next
    collective until the launcher kills them."""
    try:
        value, outcome = fn(), ("ok", None)
    except AADError as e:
        value, outcome = None, ("error", e)
    rank, world = _world()
    if world == 1:
        if outcome[0] == "error":
            raise outcome[1]
        return value
    outcomes: list[tuple[str, Any]] = [("error", None)] * world
    dist.all_gather_object(outcomes, outcome)
    _raise_first_error(outcomes, rank)
    return value


def embed_cohorts_distributed(
    model: torch.nn.Module,
    cohorts: Mapping[str, Cohort],
    preprocessing: PreprocessingConfig,
    settings: EmbedSettings | None = None,
    **options: Any,
) -> dict[str, CohortEmbedding]:
    """:func:`aad_med.embedding.cache.embed_cohorts` with the subjects split over the ranks of
    an initialised process group (plain ``embed_cohorts`` when there is none or only one rank).

    Every rank must call it with the same arguments; rank 0's ``cohorts`` are broadcast so all
    ranks shard the same subject lists. ``"auto"`` and ``"cuda"`` mean this rank's GPU
    (``cuda:LOCAL_RANK``). Rank 0 reads and writes the cache; a cached cohort is not re-encoded.
    An input error on any rank is raised on every rank (rank 0 raises the error itself).

    Args:
        model, cohorts, preprocessing, settings, options: as
            :func:`aad_med.embedding.cache.embed_cohorts`, except that the device defaults to
            ``"auto"`` (this rank's GPU when there is one).

    Returns:
        ``{name: CohortEmbedding}`` in the order of ``cohorts``, subjects in cohort order, the
        same on every rank; ``vectors`` are final (joint standardisation applied).
    """
    if settings is None:
        options = {"device": "auto", **options}
    s = EmbedSettings.resolve(settings, options)
    s = dataclasses.replace(s, device=resolve_device(s.device))
    rank, world = _world()
    if world == 1:
        return embed_cohorts_single(model, cohorts, preprocessing, s)
    feature_set = get_feature_set(s.features)
    # Rank 0 alone shows progress; every rank encodes its shard with these settings.
    shard_settings = dataclasses.replace(s, features=feature_set, progress=s.progress and rank == 0)
    checkpoint_hash, cache_dir = s.checkpoint_hash, s.cache_dir
    cohorts = from_main(dict(cohorts))
    names = list(cohorts)

    use_cache = cache_dir is not None and checkpoint_hash is not None
    entries: dict[str, Path] = {}
    if use_cache:
        for name, cohort in cohorts.items():
            entries[name] = cache_entry(
                cache_dir,
                cohort,
                checkpoint_hash,
                preprocessing,
                feature_set.name,
                s.keep_positions,
            )
    cached = {}
    if rank == 0 and use_cache:
        cached = {
            n: e
            for n in names
            if (e := load_cached(entries[n])) is not None and usable(e.quality, e.seg_checked, s)
        }
    cached = from_main(cached)

    try:
        local: dict[str, CohortEmbedding | None] = {}
        for name in names:
            if name in cached:
                continue
            cohort = cohorts[name]
            idx = shard_indices(len(cohort.subjects), rank, world)
            if not idx:
                local[name] = None
                continue
            shard = Cohort(cohort.path, cohort.layout, [cohort.subjects[i] for i in idx])
            local[name] = embed_cohort(model, shard, preprocessing, shard_settings, name=name)
        outcome: tuple[str, Any] = ("ok", local)
    except AADError as e:
        outcome = ("error", e)
    outcomes: list[tuple[str, Any]] = [("error", None)] * world
    dist.all_gather_object(outcomes, outcome)
    _raise_first_error(outcomes, rank)

    out: dict[str, CohortEmbedding] = {}
    for name in names:
        if name in cached:
            emb = cached[name]
            emb.name = name
            log.info("cohort %s: embeddings read from cache %s", name, entries[name])
        else:
            parts = [o[1][name] for o in outcomes]
            emb = merge_shards(parts, name, len(cohorts[name].subjects))
            if rank == 0 and name in entries:
                save_cached(entries[name], emb)
        out[name] = emb
    return finalize_vectors(feature_set, out)
