"""A step of ``aad-compare``: everything one encoder checkpoint gives. Embed every cohort
(sharded under torchrun, :mod:`aad_med.pipelines.sharded`; cached), standardise the vectors,
run the statistics (:func:`aad_med.distances.compare_embeddings`), the omnibus and the seed's
latent AAD, and write the embeddings, ``pairwise_aad.csv`` and, for the first encoder, the
figures, decoded mean differences and the regional map. Returns the content of that encoder's
``distances.json``; the caller (:mod:`aad_med.pipelines.compare`) adds the cross-encoder,
intensity and per-subject steps and publishes the run folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aad_med.io_utils import file_digest
from aad_med.pipelines.compare import train_overlap
from aad_med.pipelines.regional_step import pair_tag, regional_map
from aad_med.pipelines.sharded import embed as sharded_embed
from aad_med.provenance import provenance
from aad_med.report.serialize import write_matrix_csv, write_nifti
from aad_med.report.text import DEFINITIONS

if TYPE_CHECKING:
    from aad_med.embedding.encode import CohortEmbedding
    from aad_med.pipelines.compare import CompareSettings

log = logging.getLogger("aad_med.compare")


def compare_with_encoder(
    tmp,
    model,
    preprocessing,
    ckpt,
    ckpt_path,
    cohorts,
    cohort_paths,
    device,
    s,
    full: bool = True,
    return_samples: bool = False,
    reference=None,
    timer=None,
) -> dict:
    """Embed and compare with one encoder; write the embeddings (and, when ``full``, figures,
    decoded means and the regional map) into ``tmp``. The caller writes ``distances.json`` and
    the report. With a stored ``reference`` (:mod:`aad_med.pipelines.reference`) its raw
    vectors come first and are standardised jointly with the new cohorts'."""
    from aad_med.distances import compare_embeddings
    from aad_med.embedding.cache import finalize_vectors
    from aad_med.embedding.decode import decode_mean_difference
    from aad_med.embedding.encode import EmbedSettings
    from aad_med.embedding.features import get_feature_set
    from aad_med.embedding.io import write_embeddings_csv, write_embeddings_npz
    from aad_med.pipelines.feature_scale import attach_reference
    from aad_med.pipelines.omnibus_step import add_omnibus, omnibus_fingerprints
    from aad_med.pipelines.reference import raw_feature_set
    from aad_med.plots.images import plot_mean_difference

    feature_set = get_feature_set(s.features)
    if reference is not None:
        reference.check_preprocessing(preprocessing.to_dict())
    overlaps = {name: train_overlap(c, ckpt) for name, c in cohorts.items()}
    from aad_med.embedding.preprocessed import default_preprocessed_dir
    from aad_med.pipelines.timings import PhaseTimer

    timer = timer if timer is not None else PhaseTimer()
    cache_dir = s.resolved_cache_dir()
    scale = attach_reference(
        feature_set,
        ckpt,
        model,
        preprocessing,
        s.scale_reference,
        file_digest(ckpt_path) if cache_dir else None,
        cache_dir,
        device,
        s.batch_size,
    )
    mode = s.resolved_cache_mode()
    embed = EmbedSettings(
        device=device,
        batch_size=s.batch_size,
        features=feature_set,
        keep_positions=s.regional and reference is None,
        num_workers=s.num_workers,
        progress=s.progress,
        checkpoint_hash=file_digest(ckpt_path) if cache_dir else None,
        cache_dir=cache_dir,
        cache_mode=mode,
        preprocessed_dir=(
            None if mode == "off" else Path(s.preprocessed_dir or default_preprocessed_dir())
        ),
        preprocessed_max_bytes=int(s.preprocessed_max_gb * 1024**3),
        # The per-subject step's image-quality metrics from the volumes the embedding decodes
        # (and from the preprocessed cache on a second run) instead of reading them again.
        quality=s.subjects and full,
        # Validation's voxel checks happen in this decode (run_comparison).
        check_seg=not s.skip_invalid,
    )
    # Raw vectors first (a stored reference's are raw), then the standardisation: the
    # checkpoint's fixed scale, or one fitted jointly on every compared subject.
    raw_settings = dataclasses.replace(embed, features=raw_feature_set(feature_set))
    with timer.phase("embedding"):
        embs: dict[str, CohortEmbedding] = sharded_embed(
            model, cohorts, preprocessing, raw_settings, ckpt_path
        )
    for e in embs.values():
        timer.add_embedding(e.timings)
    computed = {n: e.fingerprints for n, e in embs.items() if e.fingerprints is not None}
    quality = {n: e.quality for n, e in embs.items() if e.quality is not None}
    if reference is not None:
        embs = {reference.name: reference.embedding(), **embs}
    raw = {n: e.vectors for n, e in embs.items()}
    finalize_vectors(feature_set, embs)
    names = list(embs)
    stats_t0 = time.perf_counter()
    stats = compare_embeddings(
        {n: e.vectors for n, e in embs.items()},
        n_permutations=s.n_permutations,
        n_bootstrap=s.n_bootstrap,
        seed=s.seed,
        tests=None if s.tests is None else tuple(s.tests),
        return_samples=return_samples,
    )
    result: dict = {
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_sha256": file_digest(ckpt_path),
        "latent_dim": int(embs[names[0]].latent_means.shape[1]),
        # The feature set of every statistic below (embeddings.csv holds its vectors).
        "features": feature_set.name,
        "features_description": feature_set.description,
        "dim": int(embs[names[0]].dim),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {
            "n_permutations": s.n_permutations,
            "n_bootstrap": s.n_bootstrap,
            "seed": s.seed,
            "tests": stats.get("tests"),
            "device": str(device),
        },
        "preprocessing": preprocessing.to_dict(),
    }
    result.update(stats)
    # Fixed scale of the vectors: checkpoint / reference (the same pair, the same AAD in any
    # call) or pooled (depends on the other cohorts); raw for latent.
    result["scale"] = scale
    fingerprints = (
        omnibus_fingerprints(cohorts, embs, cache_dir, computed, write=mode == "write")
        if s.intensity
        else None
    )
    # Handed on to the intensity statistic and the per-subject step, which read no volume and
    # write no cache entry again.
    if fingerprints is not None or computed:
        result["_fingerprints"] = dict(fingerprints) if fingerprints is not None else computed
    if fingerprints is not None and reference is not None:
        # A stored reference is not re-read: its fingerprint travels in the reference file.
        fingerprints = {reference.name: reference.arrays["fingerprint"], **fingerprints}
    add_omnibus(
        result["pairs"],
        {n: e.vectors for n, e in embs.items()},
        fingerprints,
        s.n_permutations,
        s.seed,
    )
    # The prose explaining each statistic comes from report/text.py alone; each encoder's
    # distances.json records what made it.
    result["definitions"] = dict(DEFINITIONS)
    result["provenance"] = provenance(ckpt_path)
    if feature_set.name != "latent":
        add_latent_aad(result["pairs"], {n: e.latent_means for n, e in embs.items()}, s)
    timer.add("statistics", time.perf_counter() - stats_t0)
    for name in names:
        info = dict(result.get("cohorts", {}).get(name, {}))
        if reference is not None and name == reference.name:
            info.update(reference.cohort_info())
        else:
            info.update(
                {
                    "path": str(Path(cohort_paths[name]).resolve()),
                    "layout": cohorts[name].layout,
                    "train_overlap": overlaps[name],
                    "skipped": list(cohorts[name].skipped),
                }
            )
        info["n_subjects"] = len(embs[name])
        info["n_patches_mean"] = float(np.mean(embs[name].n_patches))
        result.setdefault("cohorts", {})[name] = info
    write_embeddings_csv(tmp / "embeddings.csv", embs)
    write_embeddings_npz(tmp / "embeddings.npz", embs)
    write_matrix_csv(
        tmp / "pairwise_aad.csv",
        result["pairwise_aad"]["names"],
        np.asarray(result["pairwise_aad"]["matrix"]),
    )

    if not full:
        return result
    from aad_med.pipelines.subjects import final_blocks
    from aad_med.plots.comparison import comparison_figures

    result["_subjects"] = (
        {n: e.vectors for n, e in embs.items()},
        {n: e.subject_ids for n, e in embs.items()},
        final_blocks(feature_set, raw),
        quality,
    )

    figures_t0 = time.perf_counter()
    result["_images"] = comparison_figures(tmp, embs, result, s.bands_bootstrap, s.seed)
    if s.decode_means:
        for pair in result["pairs"]:
            a, b = pair["a"], pair["b"]
            diff = decode_mean_difference(
                model, embs[a].latent_means.mean(0), embs[b].latent_means.mean(0), device
            )
            tag = pair_tag(a, b)
            write_nifti(tmp / f"mean_difference_{tag}.nii.gz", diff)
            plot_mean_difference(
                diff,
                tmp / f"mean_difference_{tag}.png",
                preprocessing.channels,
                title=f"decode(mean {b}) − decode(mean {a})",
            )
            pair["mean_difference_png"] = f"mean_difference_{tag}.png"
    result["regional"] = regional_map(tmp, embs, result, s.regional)
    timer.add("figures_report", time.perf_counter() - figures_t0)
    return result


LATENT_KEYS = (
    "latent_aad",
    "latent_aad_unbiased",
    "latent_aad_p",
    "latent_aad_p_fdr",
    "latent_aad_ci95",
    "latent_aad_null_median",
    "latent_aad_null_ratio",
)
"""Per-pair keys of the seed's AAD (mean patch latents) when another feature set is used."""


def add_latent_aad(
    pairs: Sequence[dict], latent_means: Mapping[str, np.ndarray], s: CompareSettings
) -> None:
    """Add the seed's AAD of every pair (:data:`LATENT_KEYS`), computed on the plain latent means
    with the same permutation count, bootstrap count and seed as the main statistics."""
    from aad_med.distances import compare_embeddings

    latent = compare_embeddings(
        latent_means,
        n_permutations=s.n_permutations,
        n_bootstrap=s.n_bootstrap,
        seed=s.seed,
        tests=("aad",),
    )
    by_pair = {(lp["a"], lp["b"]): lp for lp in latent["pairs"]}
    for pair in pairs:
        lp = by_pair[(pair["a"], pair["b"])]
        pair.update({key: lp[key.removeprefix("latent_")] for key in LATENT_KEYS})
