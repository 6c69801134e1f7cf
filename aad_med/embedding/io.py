"""The embedding outputs users keep: ``embeddings.csv`` (one row per subject:
``subject_id, cohort, path, n_patches, z0..z{D-1}``) and ``embeddings.npz`` (the same vectors plus
the plain latent means), and reading them back so every statistic can be recomputed."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aad_med.embedding.encode import CohortEmbedding
from aad_med.errors import InputError
from aad_med.io_utils import atomic_path

CSV_FIXED = ("subject_id", "cohort", "path", "n_patches")


def write_embeddings_csv(path: str | Path, embeddings: Mapping[str, CohortEmbedding]) -> Path:
    """Write the vectors the statistics use, one row per subject, full float precision."""
    path = Path(path)
    dim = next(iter(embeddings.values())).dim if embeddings else 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*CSV_FIXED, *(f"z{j}" for j in range(dim))])
        for name, e in embeddings.items():
            for i, sid in enumerate(e.subject_ids):
                w.writerow(
                    [
                        sid,
                        name,
                        e.paths[i],
                        int(e.n_patches[i]),
                        *(repr(float(v)) for v in e.vectors[i]),
                    ]
                )
    return path


def write_embeddings_npz(path: str | Path, embeddings: Mapping[str, CohortEmbedding]) -> Path:
    """Write ``names`` (subject IDs), ``cohorts`` (labels), ``cohort_names``, ``paths``,
    ``n_patches``, ``vectors``, ``latent_means`` and ``features``."""
    path = Path(path)
    items = list(embeddings.items())
    dim = items[0][1].dim if items else 0
    latent_dim = items[0][1].latent_means.shape[1] if items else 0
    arrays = {
        "names": np.array([s for _, e in items for s in e.subject_ids], dtype=str),
        "cohorts": np.array([n for n, e in items for _ in e.subject_ids], dtype=str),
        "cohort_names": np.array([n for n, _ in items], dtype=str),
        "paths": np.array([p for _, e in items for p in e.paths], dtype=str),
        "n_patches": np.concatenate([e.n_patches for _, e in items]) if items else np.zeros(0),
        "vectors": np.concatenate([e.vectors for _, e in items]) if items else np.zeros((0, dim)),
        "latent_means": (
            np.concatenate([e.latent_means for _, e in items])
            if items
            else np.zeros((0, latent_dim))
        ),
        "features": np.array(items[0][1].features if items else "latent"),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def read_embeddings_csv(path: str | Path) -> dict[str, np.ndarray]:
    """``{cohort: (n, D) vectors}`` from an ``embeddings.csv``, cohorts in order of appearance.

    Raises:
        InputError: missing file or a header without the fixed columns.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "embeddings file does not exist")
    rows: dict[str, list[list[float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if tuple(header[: len(CSV_FIXED)]) != CSV_FIXED:
            raise InputError(path, f"expected columns {', '.join(CSV_FIXED)}, z0, ...")
        for row in reader:
            rows.setdefault(row[1], []).append([float(v) for v in row[len(CSV_FIXED) :]])
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def read_embeddings_npz(path: str | Path) -> dict[str, np.ndarray]:
    """``{cohort: (n, D) vectors}`` from an ``embeddings.npz``."""
    with np.load(path, allow_pickle=False) as d:
        labels, vectors, order = d["cohorts"], d["vectors"], d["cohort_names"]
        return {str(n): vectors[labels == n] for n in order}
