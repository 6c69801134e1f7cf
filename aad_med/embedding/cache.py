"""Embedding several cohorts with an on-disk cache, so re-running the statistics (other
permutation counts, other pairs) never re-encodes.

A cohort's cache entry is keyed by the checkpoint file's SHA-256, the preprocessing config, the
feature set, whether positions were kept, and every subject's files (path, size, modification
time): change any of them and the entry is simply not found. Entries are ``.npz`` files read with
``allow_pickle=False``, written atomically.
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
from aad_med.data.records import Cohort
from aad_med.embedding.encode import (
    CohortEmbedding,
    EmbedSettings,
    embed_cohort,
)
from aad_med.embedding.features import FeatureSet, get_feature_set
from aad_med.embedding.regional import RegionalLatents
from aad_med.io_utils import atomic_path, cache_key, file_stats

log = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bumped whenever encoding changes what it produces (invalidates old entries)."""


def cohort_cache_key(
    cohort: Cohort,
    checkpoint_hash: str,
    preprocessing: PreprocessingConfig,
    features: str,
    keep_positions: bool,
) -> str:
    """Hex key of one cohort's embedding (see the module docstring for what it covers)."""
    subjects = [[rec.subject_id, file_stats(rec.files), rec.as_dict()] for rec in cohort.subjects]
    payload = {
        "v": CACHE_VERSION,
        "checkpoint": checkpoint_hash,
        "preprocessing": preprocessing.to_dict(),
        "features": features,
        "keep_positions": bool(keep_positions),
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
    }
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
    )


def cache_entry(
    cache_dir: str | Path,
    cohort: Cohort,
    checkpoint_hash: str,
    preprocessing: PreprocessingConfig,
    features: str,
    keep_positions: bool,
) -> Path:
    """Where one cohort's embedding is cached in ``cache_dir`` (:func:`cohort_cache_key`)."""
    key = cohort_cache_key(cohort, checkpoint_hash, preprocessing, features, keep_positions)
    return Path(cache_dir) / f"{key}.npz"


def save_cached(path: str | Path, embedding: CohortEmbedding) -> Path:
    """Write one cohort's embedding as ``.npz`` (atomic rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **_to_arrays(embedding))
    return path


def load_cached(path: str | Path) -> CohortEmbedding | None:
    """Read an entry written by :func:`save_cached`; ``None`` when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as d:
            return _from_arrays({k: d[k] for k in d.files})
    except (OSError, ValueError, KeyError) as e:
        log.warning("ignoring unreadable embedding cache entry %s (%s)", path, e)
        return None


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
            )
            cached = load_cached(entry)
            if cached is not None:
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
    """Replace every cohort's ``vectors`` by the feature set's joint standardisation, fitted on
    all compared subjects together (in place; returns ``embeddings``)."""
    final = feature_set.finalize({k: v.vectors for k, v in embeddings.items()})
    for name, emb in embeddings.items():
        emb.vectors = np.asarray(final[name], dtype=np.float64)
    return embeddings
