"""A step of ``aad-compare``: the omnibus verdict of every pair ("do these cohorts differ at
all?"), one exact permutation test combining the AAD on the comparison's features, the raw-image
intensity fingerprint, MMD and energy (:mod:`aad_med.distances.omnibus`).

Every component sees the same label shuffles, so the combined p-value is exact; the AAD keeps its
own p-value (``aad_p``) as the distance. The omnibus p-values are adjusted across pairs by
Benjamini-Hochberg like ``aad_p``. The pair's generator is seeded from the cohort names, so the
same pair gets the same verdict in any call. Statistics only; the caller writes the files.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import numpy as np

OMNIBUS_KEYS = (
    "omnibus_p",
    "omnibus_p_fdr",
    "omnibus_driver",
    "omnibus_combine",
    "omnibus_components",
    "omnibus_statistics",
)
"""Per-pair keys the step adds to ``distances.json`` (meanings in ``report.text.DEFINITIONS``)."""

OMNIBUS_STREAM = 2
"""Generator stream of the omnibus (the main statistics use stream 1, the bootstrap 0)."""


def omnibus_fingerprints(
    cohorts: Mapping,
    embeddings: Mapping,
    cache_dir,
    computed: Mapping[str, np.ndarray] | None = None,
    write: bool = True,
) -> dict[str, np.ndarray] | None:
    """Every cohort's raw intensity fingerprint in its embedding's subject order (``computed``
    by the embedding from the volumes it decoded, else read once and cached with the
    embeddings); ``None`` when a cohort's subjects differ from its embedding's.
    """
    from aad_med.data.intensity import cached_fingerprint

    computed = computed or {}
    out = {}
    for name, cohort in cohorts.items():
        if list(cohort.subject_ids) != list(embeddings[name].subject_ids):
            return None
        out[name] = cached_fingerprint(cohort, cache_dir, computed.get(name), write=write)
    return out


def add_omnibus(
    pairs: Sequence[MutableMapping],
    vectors: Mapping[str, np.ndarray],
    fingerprints: Mapping[str, np.ndarray] | None,
    n_permutations: int,
    seed: int,
    combine: str = "min_p",
) -> None:
    """Add :data:`OMNIBUS_KEYS` to every pair (in place).

    Args:
        pairs: the ``pairs`` of :func:`aad_med.distances.compare_embeddings` (``a``, ``b``).
        vectors: ``{cohort: (n, F)}`` finalised feature vectors (the AAD's).
        fingerprints: ``{cohort: (n, P)}`` raw intensity fingerprints in the same subject order,
            or ``None`` to leave that component out.
        n_permutations: label shuffles (the comparison's ``stats.n_permutations``).
        seed: the comparison's seed.
        combine: ``"min_p"`` or ``"fisher"``.
    """
    from aad_med.distances.omnibus import default_components, omnibus_permutation_test, pair_seed
    from aad_med.distances.univariate import bh_fdr

    for pair in pairs:
        a, b = pair["a"], pair["b"]
        fa = fb = None
        if fingerprints is not None:
            fa, fb = fingerprints[a], fingerprints[b]
        comps = default_components(vectors[a], vectors[b], fa, fb)
        res = omnibus_permutation_test(
            comps,
            n_permutations=n_permutations,
            seed=np.random.default_rng(pair_seed(seed, a, b, OMNIBUS_STREAM)),
            combine=combine,
        )
        out = res.to_dict()
        out.pop("n_permutations")
        pair.update(out)
        pair["omnibus_p_fdr"] = None
    if pairs:
        for pair, q in zip(pairs, bh_fdr([p["omnibus_p"] for p in pairs]), strict=True):
            pair["omnibus_p_fdr"] = float(q)


__all__ = ["OMNIBUS_KEYS", "add_omnibus", "omnibus_fingerprints"]
