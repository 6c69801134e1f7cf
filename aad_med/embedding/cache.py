"""Embedding several cohorts with an on-disk cache, so re-running the statistics (other
permutation counts, other pairs) never re-encodes.

A cohort's cache entry is keyed by the checkpoint file's SHA-256, the preprocessing config, the
feature set, whether positions were kept, the image-quality metrics' version
(:data:`aad_med.data.quality.QUALITY_VERSION`: entries may hold their rows), and every subject's files (path, size, modification
time and content digest, :func:`aad_med.io_utils.file_stats`): change any of them and the entry is
simply not found. Entries are ``.npz`` files read with ``allow_pickle=False``, written atomically.
The cache heals: an entry that cannot be read or does not hold this cohort's embedding (truncated,
emptied, flipped bytes, wrong shapes, other subjects) is a
:class:`~aad_med.io_utils.CacheWarning`, deleted and recomputed; a cache folder that cannot be
written means running uncached with a warning. A cache entry never fails a run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.quality import QUALITY_VERSION
from aad_med.data.records import Cohort
from aad_med.embedding.encode import (
    CohortEmbedding,
    EmbedSettings,
    embed_cohort,
)
from aad_med.embedding.features import FeatureSet, get_feature_set
from aad_med.embedding.preprocessed import usable
from aad_med.embedding.regional import RegionalLatents
from aad_med.io_utils import (
    DigestMemo,
    cache_key,
    file_stats,
    read_cache_entry,
    write_cache_entry,
)

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever encoding changes what it produces (invalidates old entries)."""


def cohort_cache_key(
    cohort: Cohort,
    checkpoint_hash: str,
    preprocessing: PreprocessingConfig,
    features: str,
    keep_positions: bool,
    memo: DigestMemo | None = None,
) -> str:
    """Hex key of one cohort's embedding (see the module docstring for what it covers); ``memo``
    keeps the files' digests across runs (:class:`aad_med.io_utils.DigestMemo`)."""
    subjects = [
        [rec.subject_id, file_stats(rec.files, memo), rec.as_dict()] for rec in cohort.subjects
    ]
    payload = {
        "v": CACHE_VERSION,
        "checkpoint": checkpoint_hash,
        "preprocessing": preprocessing.to_dict(),
        "features": features,
        "keep_positions": bool(keep_positions),
        "quality": QUALITY_VERSION,
        "subjects": subjects,
    }
    return cache_key(payload)


def _to_arrays(e: CohortEmbedding) -> dict[str, np.ndarray]:
    out = {
        "name": np.array(e.name),
        "subject_ids": np.array(e.subject_ids, dtype=str),
        "paths": np.array(e.paths, dtype=str),
        "n_patches": e.n_patches,
        "vectors": e.vectors,
        "latent_means": e.latent_means,
        "features": np.array(e.features),
        "has_regional": np.array(e.regional is not None),
        "seg_checked": np.array(e.seg_checked),
    }
    if e.quality is not None:
        out["quality"] = e.quality
    if e.regional is not None:
        r = e.regional
        out.update(
            {
                "r_cell_size": np.array(r.cell_size),
                "r_patch_size": np.array(r.patch_size),
                "r_cells": r.cells,
                "r_sums": r.sums,
                "r_counts": r.counts,
                "r_image_sum": r.image_sum,
                "r_n_images": np.array(r.n_images),
                "r_ras_shape": np.array(r.ras_shape),
                "r_ras_affine": r.ras_affine,
                "r_same_space": np.array(r.same_space),
            }
        )
    return out


def _from_arrays(d: Mapping[str, np.ndarray]) -> CohortEmbedding:
    regional = None
    if bool(d["has_regional"]):
        regional = RegionalLatents(
            cell_size=int(d["r_cell_size"]),
            patch_size=int(d["r_patch_size"]),
            cells=d["r_cells"],
            sums=d["r_sums"],
            counts=d["r_counts"],
            image_sum=d["r_image_sum"],
            n_images=int(d["r_n_images"]),
            ras_shape=tuple(int(v) for v in d["r_ras_shape"]),
            ras_affine=d["r_ras_affine"],
            same_space=bool(d["r_same_space"]),
        )
    return CohortEmbedding(
        name=str(d["name"]),
        subject_ids=[str(s) for s in d["subject_ids"]],
        paths=[str(s) for s in d["paths"]],
        n_patches=np.asarray(d["n_patches"], dtype=np.int64),
        vectors=np.asarray(d["vectors"], dtype=np.float64),
        latent_means=np.asarray(d["latent_means"], dtype=np.float64),
        features=str(d["features"]),
        regional=regional,
        quality=np.asarray(d["quality"], dtype=np.float64) if "quality" in d else None,
        seg_checked=bool(d["seg_checked"]) if "seg_checked" in d else False,
    )


def cache_entry(
    cache_dir: str | Path,
    cohort: Cohort,
    checkpoint_hash: str,
    preprocessing: PreprocessingConfig,
    features: str,
    keep_positions: bool,
    write_digests: bool = False,
) -> Path:
    """Where one cohort's embedding is cached in ``cache_dir`` (:func:`cohort_cache_key`).

    The input files' digests are looked up in ``cache_dir/digests``
    (:class:`aad_med.io_utils.DigestMemo`) and, with ``write_digests``, added there.
    """
    memo = DigestMemo(Path(cache_dir) / "digests", write=write_digests)
    key = cohort_cache_key(cohort, checkpoint_hash, preprocessing, features, keep_positions, memo)
    return Path(cache_dir) / f"{key}.npz"


def save_cached(path: str | Path, embedding: CohortEmbedding) -> bool:
    """Write one cohort's embedding as ``.npz`` (atomic rename); a folder that cannot take it is
    a warning (:func:`aad_med.io_utils.write_cache_entry`). Returns whether it was written."""
    arrays = _to_arrays(embedding)
    return write_cache_entry(path, lambda f: np.savez(f, **arrays), "embedding cache")


def _check_embedding(e: CohortEmbedding, cohort: Cohort | None, features: str | None) -> None:
    """Raise ``ValueError`` unless ``e`` is a well-formed embedding (of ``cohort``'s subjects
    with ``features`` when given)."""
    n = len(e.subject_ids)
    if e.vectors.ndim != 2 or e.latent_means.ndim != 2 or e.n_patches.shape != (n,):
        raise ValueError("arrays of the wrong rank")
    if e.vectors.shape[0] != n or e.latent_means.shape[0] != n or len(e.paths) != n:
        raise ValueError(f"{n} subject ids but {e.vectors.shape[0]} vectors")
    if n == 0 or e.vectors.shape[1] == 0 or e.latent_means.shape[1] == 0:
        raise ValueError("empty embedding")
    if not (np.isfinite(e.vectors).all() and np.isfinite(e.latent_means).all()):
        raise ValueError("non-finite values")
    if e.quality is not None and (e.quality.ndim != 2 or e.quality.shape[0] != n):
        raise ValueError(f"quality rows of shape {e.quality.shape} for {n} subjects")
    if features is not None and e.features != features:
        raise ValueError(f"feature set {e.features!r}, expected {features!r}")
    if cohort is not None and e.subject_ids != [r.subject_id for r in cohort.subjects]:
        raise ValueError("subjects differ from the cohort's")
    r = e.regional
    if r is not None:
        if r.sums.shape[0] != r.counts.shape[0] or r.cells.shape[0] != r.counts.shape[0]:
            raise ValueError("regional arrays of mismatched lengths")
        if len(r.ras_shape) != 3 or r.ras_affine.shape != (4, 4):
            raise ValueError("regional grid of the wrong shape")


def load_cached(
    path: str | Path, cohort: Cohort | None = None, features: str | None = None
) -> CohortEmbedding | None:
    """Read an entry written by :func:`save_cached`; ``None`` when missing, and when unreadable
    or malformed (then it is deleted with a warning, :func:`aad_med.io_utils.read_cache_entry`).

    Args:
        path: the entry.
        cohort: when given, the entry must hold exactly its subjects, in order.
        features: when given, the entry's feature set must be this one.
    """

    def read(p: Path) -> CohortEmbedding:
        with np.load(p, allow_pickle=False) as d:
            emb = _from_arrays({k: d[k] for k in d.files})
        _check_embedding(emb, cohort, features)
        return emb

    return read_cache_entry(path, read, "embedding cache")


def default_cache_dir() -> Path:
    """``$AAD_MED_CACHE/embeddings`` or ``~/.cache/aad-med/embeddings``."""
    root = os.environ.get("AAD_MED_CACHE") or Path.home() / ".cache" / "aad-med"
    return Path(root) / "embeddings"


def embed_cohorts(
    model: torch.nn.Module,
    cohorts: Mapping[str, Cohort],
    preprocessing: PreprocessingConfig,
    settings: EmbedSettings | None = None,
    **options: Any,
) -> dict[str, CohortEmbedding]:
    """Embed several cohorts, reusing cached entries, then apply the feature set's joint
    standardisation (fitted on all compared subjects).

    Args:
        model, preprocessing: as :func:`aad_med.embedding.encode.embed_cohort`.
        cohorts: ``{name: cohort}``, compared in this order.
        settings: :class:`~aad_med.embedding.encode.EmbedSettings`; caching needs both its
            ``checkpoint_hash`` and ``cache_dir``.
        **options: :class:`~aad_med.embedding.encode.EmbedSettings` fields overriding
            ``settings``.

    Returns:
        ``{name: CohortEmbedding}`` in the order of ``cohorts``; ``vectors`` are final.
    """
    s = EmbedSettings.resolve(settings, options)
    feature_set = get_feature_set(s.features)
    s = dataclasses.replace(s, features=feature_set)
    use_cache = s.cache_dir is not None and s.checkpoint_hash is not None and s.cache_mode != "off"
    out: dict[str, CohortEmbedding] = {}
    for name, cohort in cohorts.items():
        entry = None
        if use_cache:
            entry = cache_entry(
                s.cache_dir,
                cohort,
                s.checkpoint_hash,
                preprocessing,
                feature_set.name,
                s.keep_positions,
                write_digests=s.cache_mode == "write",
            )
            cached = load_cached(entry, cohort, feature_set.name)
            # An entry written without the quality rows or seg check asked for now is embedded
            # again (the preprocessed cache makes that cheap) and replaced.
            if cached is not None and usable(cached.quality, cached.seg_checked, s):
                log.info("cohort %s: embeddings read from cache %s", name, entry)
                cached.name = name
                out[name] = cached
                continue
        emb = embed_cohort(model, cohort, preprocessing, s, name=name)
        if entry is not None and s.cache_mode == "write":
            save_cached(entry, emb)
        out[name] = emb
    return finalize_vectors(feature_set, out)


def finalize_vectors(
    feature_set: FeatureSet, embeddings: dict[str, CohortEmbedding]
) -> dict[str, CohortEmbedding]:
    """Replace every cohort's ``vectors`` by the feature set's standardisation: the fixed
    reference the set carries (``feature_set.reference``), else one fitted on all compared
    subjects together (in place; returns ``embeddings``)."""
    final = feature_set.finalize(
        {k: v.vectors for k, v in embeddings.items()}, reference=feature_set.reference
    )
    for name, emb in embeddings.items():
        emb.vectors = np.asarray(final[name], dtype=np.float64)
    return embeddings
