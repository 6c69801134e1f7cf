"""A step of ``aad-compare``: the intensity fingerprint statistic of every pair of cohorts (its
own permutation test on the raw images' per-channel foreground percentiles, not an AAD), and
``intensity_fingerprint.csv``. The fingerprints come from the embedding's decode when it
computed them, else from the fingerprint cache or the volumes
(:mod:`aad_med.data.intensity`). Statistics and this one table; the caller orders the steps
(:mod:`aad_med.pipelines.compare`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aad_med.data.records import Cohort
from aad_med.report.serialize import write_table_csv
from aad_med.report.text import INTENSITY_EXPLANATION

if TYPE_CHECKING:
    from aad_med.pipelines.compare import CompareSettings

log = logging.getLogger("aad_med.compare")


INTENSITY_KEYS = ("intensity_distance", "intensity_p", "intensity_p_fdr", "intensity_null_ratio")
"""Per-pair keys of the intensity fingerprint statistic (its own statistic, not an AAD)."""


def intensity_statistics(
    cohorts: Mapping[str, Cohort],
    s: CompareSettings,
    known: Mapping[str, np.ndarray] | None = None,
    fingerprints: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[tuple[str, str], dict], float]:
    """The intensity fingerprint statistic of every pair of cohorts.

    Each subject's raw volumes are read once more for their per-channel foreground percentiles
    before any normalisation (:func:`aad_med.data.intensity.intensity_fingerprint`). For each
    pair the columns are z-scored over the pair's subjects (a transform symmetric in them, so
    permutation p-values stay exact) and compared with the AAD permutation test (same
    permutation count and seed as the main statistics, generators seeded by the cohort names):
    a pair gets the same distance and p-value in any call, whatever other cohorts are compared
    with it. The p-values are then adjusted across the pairs (Benjamini-Hochberg).

    With ``s.cache`` the fingerprints are kept in the embedding cache folder, so a rerun does
    not read the volumes again (:func:`aad_med.data.intensity.cached_fingerprint`). ``known``
    holds fingerprints already computed (a stored reference's), placed first.

    ``fingerprints`` (per cohort, computed by the embedding from the volumes it decoded) are
    used instead of reading the volumes again.

    Returns:
        ``(raw fingerprints per cohort, {(a, b): INTENSITY_KEYS values}, seconds spent reading)``.
    """
    from aad_med.data.intensity import cached_fingerprint
    from aad_med.distances import compare_embeddings
    from aad_med.distances.univariate import bh_fdr
    from aad_med.embedding.acquisition import standardize_jointly

    t0 = time.perf_counter()
    cache_dir = s.resolved_cache_dir()
    given = fingerprints or {}
    write = s.resolved_cache_mode() == "write"
    raw = dict(known or {})
    raw.update(
        {
            name: given[name] if name in given else cached_fingerprint(c, cache_dir, write=write)
            for name, c in cohorts.items()
        }
    )
    seconds = time.perf_counter() - t0
    pairs = {}
    for a, b in combinations(raw, 2):
        # Standardised over this pair alone: with the scale of every compared subject, adding a
        # third cohort would change this pair's distance (as the omnibus's fingerprint does).
        (p,) = compare_embeddings(
            standardize_jointly({a: raw[a], b: raw[b]}),
            n_permutations=s.n_permutations,
            n_bootstrap=s.n_bootstrap,
            seed=s.seed,
            tests=("aad",),
        )["pairs"]
        pairs[(a, b)] = {
            "intensity_distance": p["aad"],
            "intensity_p": p["aad_p"],
            "intensity_null_ratio": p["aad_null_ratio"],
        }
    for values, q in zip(
        pairs.values(), bh_fdr([v["intensity_p"] for v in pairs.values()]), strict=True
    ):
        values["intensity_p_fdr"] = float(q)
    return raw, pairs, seconds


def add_intensity(
    result: dict,
    cohorts: Mapping[str, Cohort],
    s: CompareSettings,
    tmp: Path,
    reference=None,
    fingerprints: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Intensity fingerprint statistic into ``result`` and ``intensity_fingerprint.csv``;
    returns the raw fingerprints (a stored ``reference``'s first). ``fingerprints`` computed by
    the embedding are used instead of reading the volumes again."""
    from aad_med import CHANNELS
    from aad_med.data.intensity import FINGERPRINT_PERCENTILES, fingerprint_columns

    known = {reference.name: reference.arrays["fingerprint"]} if reference is not None else None
    raw, pairs, seconds = intensity_statistics(cohorts, s, known, fingerprints)
    ids = {name: c.subject_ids for name, c in cohorts.items()}
    if reference is not None:
        ids = {reference.name: reference.subject_ids, **ids}
    n = sum(len(v) for v in ids.values())
    # Logged, not written to distances.json: two runs of one comparison give the same file.
    log.info("intensity fingerprint of %d subjects in %.2f s", n, seconds)
    for pair in result["pairs"]:
        pair.update(pairs[(pair["a"], pair["b"])])
    columns = fingerprint_columns()
    rows = [
        [sid, name, *(repr(float(v)) for v in raw[name][i])]
        for name, subject_ids in ids.items()
        for i, sid in enumerate(subject_ids)
    ]
    write_table_csv(tmp / "intensity_fingerprint.csv", ["subject_id", "cohort", *columns], rows)
    result["intensity"] = {
        "description": INTENSITY_EXPLANATION,
        "percentiles": list(FINGERPRINT_PERCENTILES),
        "channels": list(CHANNELS),
        "columns": columns,
        "cohort_medians": {
            name: dict(zip(columns, np.median(v, axis=0).tolist(), strict=True))
            for name, v in raw.items()
        },
        "file": "intensity_fingerprint.csv",
    }
    return raw
