"""Stage 4, embedding: the fixed scale of the feature blocks (a pair's AAD must not depend on the
other cohorts of a call).

Standardising every column over all compared subjects makes a pair's AAD change when other
cohorts join the call (issue 18: 2.19 alone, 2.89 among 10 cohorts). Here each block's column
centre and scale are fitted once, on a *reference* set of subjects, and stored as plain float
lists (``torch.load(weights_only=True)``-safe):

* by ``aad-train`` at the end of training, over the encoder's training and validation subjects
  (``checkpoint["feature_reference"]``, :func:`reference_from_subjects`);
* for older checkpoints, from a cohort the user names (``embedding.reference=COHORT``), cached
  by checkpoint hash, preprocessing, feature set and the cohort's files
  (:func:`cohort_reference`).

A reference holds, per block (``multiscale``, ``texture``, ``input_texture``,
``intensity_shape``, ...): ``mean`` (column median), ``scale`` (1.4826 x the median absolute
deviation, the standard deviation where that is 0, floored at :data:`SCALE_FLOOR` x the block's
median scale so a nearly constant column cannot blow up), ``keep`` (columns that vary at all),
``width`` (the block's column count, for the 1/sqrt(width) weight) and ``n_subjects``. Applying
it (:func:`apply_block`) is an affine map of each subject on its own, which does not look at the
labels, so permutation p-values stay exact.

``position_matched`` standardises per grid position against the compared subjects and has no
fixed reference here (it keeps the pooled standardisation). No statistics and no file writing
beyond the reference cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aad_med.errors import ConfigError

log = logging.getLogger(__name__)

REFERENCE_VERSION = 1
"""Layout of ``feature_reference``; bumped when the fitted quantities change."""

MAD_TO_SD = 1.4826
"""Median absolute deviation -> standard deviation for a normal distribution."""

SCALE_FLOOR = 0.1
"""A column's scale is at least this fraction of its block's median scale."""

REFERENCE_BLOCKS: tuple[str, ...] = (
    "latent",
    "multiscale",
    "texture",
    "dispersion",
    "input_texture",
    "intensity_shape",
    "intensity_variation",
)
"""Blocks ``aad-train`` fits a reference for: every part of every registered combination, so
any feature set but ``position_matched`` gets a fixed scale from a new checkpoint."""

SCALE_CHECKPOINT = "checkpoint"
SCALE_REFERENCE = "reference"
SCALE_POOLED = "pooled"
SCALE_RAW = "raw"


def fit_block(raw: np.ndarray) -> dict[str, Any]:
    """Robust centre and scale of every column of one block's raw ``(n, F)`` vectors.

    Args:
        raw: reference subjects' raw block vectors (at least 2 rows).

    Returns:
        ``{"mean", "scale", "keep", "width", "n_subjects"}`` as plain lists and ints.

    Raises:
        ValueError: fewer than 2 subjects or non-finite values.
    """
    x = np.asarray(raw, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError("a feature reference needs at least 2 subjects")
    if not np.isfinite(x).all():
        raise ValueError("a feature reference needs finite feature values")
    centre = np.median(x, axis=0)
    mad = MAD_TO_SD * np.median(np.abs(x - centre), axis=0)
    sd = x.std(axis=0)
    keep = sd > 1e-12 * (1.0 + np.abs(centre))
    scale = np.where(mad > 1e-12 * (1.0 + np.abs(centre)), mad, sd)
    if keep.any():
        floor = SCALE_FLOOR * float(np.median(scale[keep]))
        scale = np.maximum(scale, floor)
    scale = np.where(keep, scale, 1.0)
    return {
        "mean": [float(v) for v in centre],
        "scale": [float(v) for v in scale],
        "keep": [bool(v) for v in keep],
        "width": int(x.shape[1]),
        "n_subjects": int(x.shape[0]),
    }


def apply_block(raw: np.ndarray, block: Mapping[str, Any], name: str = "block") -> np.ndarray:
    """The fixed affine map of one block, subject by subject: ``(x - mean) / scale`` on kept
    columns, 0 on the others.

    Raises:
        ConfigError: the block's width differs from the reference's.
    """
    x = np.asarray(raw, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    mean = np.asarray(block["mean"], dtype=np.float64)
    if x.shape[1] != mean.size:
        raise ConfigError(
            f"feature reference for {name!r} has {mean.size} columns but the vectors have "
            f"{x.shape[1]}; the reference was made with another model or feature layout"
        )
    scale = np.asarray(block["scale"], dtype=np.float64)
    keep = np.asarray(block["keep"], dtype=bool)
    return np.where(keep, (x - mean) / scale, 0.0)


def parts_of(feature_set) -> list:
    """The blocks of a feature set: its parts for a combination, else the set itself."""
    return list(getattr(feature_set, "parts", None) or [feature_set])


def supports_reference(feature_set) -> bool:
    """Whether every block of ``feature_set`` can take a fixed reference."""
    return all(p.name != "position_matched" for p in parts_of(feature_set))


def fit_reference(feature_set, raw_vectors: np.ndarray, subjects: Sequence[str] = ()) -> dict:
    """A reference for every block of ``feature_set`` from raw vectors of reference subjects.

    Args:
        feature_set: the :class:`~aad_med.embedding.features.FeatureSet` that made the vectors.
        raw_vectors: ``(n, F)`` raw (not finalised) vectors.
        subjects: the reference subjects' IDs (recorded, for provenance).

    Returns:
        ``{"version", "n_subjects", "subjects", "blocks": {block: fit_block(...)}}``.
    """
    raw = np.asarray(raw_vectors, dtype=np.float64)
    parts = parts_of(feature_set)
    if not supports_reference(feature_set):
        raise ConfigError(f"{feature_set.name}: position_matched has no fixed reference")
    pieces = feature_set.split(raw) if hasattr(feature_set, "split") else [raw]
    return {
        "version": REFERENCE_VERSION,
        "n_subjects": int(raw.shape[0]),
        "subjects": [str(s) for s in subjects],
        "blocks": {p.name: fit_block(b) for p, b in zip(parts, pieces, strict=True)},
    }


def missing_blocks(feature_set, reference: Mapping | None) -> list[str]:
    """Blocks of ``feature_set`` the reference lacks (all of them without a reference)."""
    blocks = (reference or {}).get("blocks", {})
    return [p.name for p in parts_of(feature_set) if p.name not in blocks]


def merge_references(a: Mapping | None, b: Mapping) -> dict:
    """``a`` with ``b``'s blocks added (``b`` wins); subjects and counts from ``b``."""
    out = dict(b)
    out["blocks"] = {**dict((a or {}).get("blocks", {})), **dict(b.get("blocks", {}))}
    return out


# --------------------------------------------------------------------------------------------
# Filling a reference: aad-train's end-of-training pass and a cohort for older checkpoints.


def reference_feature_set(blocks: Sequence[str] = REFERENCE_BLOCKS):
    """One combined feature set over ``blocks`` (a single pass computes every block)."""
    from aad_med.embedding.acquisition import ConcatFeatureSet

    return ConcatFeatureSet(list(blocks), name="+".join(blocks))


def reference_from_subjects(
    model,
    cohort,
    preprocessing,
    device="cpu",
    blocks: Sequence[str] = REFERENCE_BLOCKS,
    batch_size: int = 32,
) -> dict:
    """Embed ``cohort`` on the evaluation grid with every block of ``blocks`` and fit a reference.

    Args:
        model: the trained autoencoder (eval mode).
        cohort: the reference subjects (a :class:`~aad_med.data.records.Cohort`).
        preprocessing: the checkpoint's preprocessing.
        device: where to encode.
        blocks: block names to fit.
        batch_size: patches per forward pass.

    Returns:
        The reference (:func:`fit_reference`).
    """
    from aad_med.embedding.encode import EmbedSettings, embed_cohort

    blocks = list(blocks)
    fs = reference_feature_set(blocks)
    settings = EmbedSettings(device=device, batch_size=batch_size, features=fs, progress=False)
    try:
        emb = embed_cohort(model, cohort, preprocessing, settings, name="reference")
    except ValueError as e:
        # intensity_variation needs 5 mostly-brain patches per subject (small volumes lack
        # them): the other blocks still get their reference.
        if "intensity_variation" not in blocks or len(blocks) == 1:
            raise
        log.warning("feature reference without intensity_variation (%s)", e)
        rest = [b for b in blocks if b != "intensity_variation"]
        return reference_from_subjects(model, cohort, preprocessing, device, rest, batch_size)
    return fit_reference(fs, emb.vectors, emb.subject_ids)


def cohort_reference(
    model,
    cohort,
    preprocessing,
    feature_set,
    checkpoint_hash: str | None,
    cache_dir: str | Path | None,
    device="cpu",
    batch_size: int = 32,
) -> dict:
    """The reference of ``feature_set``'s blocks from a user-named cohort, cached as JSON by
    checkpoint hash, preprocessing, blocks and the cohort's files."""
    from aad_med.io_utils import atomic_path, cache_key, file_stats

    blocks = [p.name for p in parts_of(feature_set)]
    path = None
    if cache_dir is not None and checkpoint_hash is not None:
        key = cache_key(
            {
                "kind": "feature_reference",
                "v": REFERENCE_VERSION,
                "checkpoint": checkpoint_hash,
                "preprocessing": preprocessing.to_dict(),
                "blocks": blocks,
                "subjects": [[r.subject_id, file_stats(r.files)] for r in cohort.subjects],
            }
        )
        path = Path(cache_dir) / f"reference-{key}.json"
        if path.is_file():
            try:
                ref = json.loads(path.read_text())
                if not missing_blocks(feature_set, ref):
                    log.info("feature reference read from cache %s", path)
                    return ref
            except (OSError, ValueError) as e:
                log.warning("ignoring unreadable feature reference %s (%s)", path, e)
    ref = reference_from_subjects(model, cohort, preprocessing, device, blocks, batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(ref))
    return ref


__all__ = [
    "MAD_TO_SD",
    "REFERENCE_BLOCKS",
    "SCALE_CHECKPOINT",
    "SCALE_FLOOR",
    "SCALE_POOLED",
    "SCALE_RAW",
    "SCALE_REFERENCE",
    "apply_block",
    "cohort_reference",
    "fit_block",
    "fit_reference",
    "merge_references",
    "missing_blocks",
    "reference_from_subjects",
    "supports_reference",
]
