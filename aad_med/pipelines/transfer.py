"""The body of ``aad-transfer``: does the AAD predict what a segmentation model loses on another
cohort, and which candidate source is closest to a target?

Two modes, one settings object (:class:`TransferSettings`):

- **transfer** (:func:`run_transfer`): train a segmenter on a split of the source (or read the
  user's per-subject scores, ``performance=CSV``), score the held-out source subjects and every
  target, compute every distance source → target with the encoder checkpoint (default AAD, the
  seed's latent AAD, MMD, energy, intensity fingerprint), relate each distance to the Dice drop
  (Spearman, Kendall, monotone fit) and write ``transfer.json``, ``transfer.csv``,
  ``scores.csv``, ``plots/drop_vs_<distance>.png`` and ``transfer.md``.
- **selection** (:func:`aad_med.pipelines.selection.run_selection`): rank candidate sources for one target by each distance;
  with ``verify`` train one segmenter per source and report whether the closest source scored
  best (top-1) and the rank correlation of distance with the achieved Dice.

Each distance of a target is computed on the pair (source held-out subjects, target) exactly as
``aad-compare`` would compute it for those two cohorts (joint standardisation fitted on the
pair), so a fitted curve reads an ``aad-compare`` AAD of a new cohort as a predicted drop.

Inputs are all checked (cohorts, CSV, checkpoint) before anything is trained or written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from aad_med import DEFAULT_FEATURES
from aad_med.data.records import Cohort, SubjectRecord
from aad_med.errors import ConfigError
from aad_med.pipelines.performance import read_performance, scores_for
from aad_med.segmentation.regions import convention_for_layout
from aad_med.segmentation.training import SegmentationSettings, split_train_test

log = logging.getLogger("aad_med.transfer")

DISTANCES: tuple[str, ...] = (
    "aad",
    "aad_unbiased",
    "latent_aad",
    "mmd",
    "energy",
    "intensity",
    "confidence_aad",
)
"""Distances related to the drop: the AAD of the default features and its bias-corrected form,
the seed's AAD (mean patch latents), MMD² and energy distance of the default features, the
intensity fingerprint AAD, and a task-aware distance read off the segmenter trained here
(:data:`SEGMENTER_DISTANCES`)."""

SEGMENTER_DISTANCES: dict[str, str] = {"confidence_aad": "confidence"}
"""Distances computed from the trained segmenter's own per-subject features (blocks of
:data:`aad_med.segmentation.evaluation.TASK_FEATURES`): the bias-corrected AAD of its per-region
confidence around the predicted boundary (a difference of confidences). Bias-corrected because a
prediction must not grow with a small target's sampling noise. ``None`` when no segmenter is
trained here (``performance=CSV``): there is no model to read them from. (The AAD of its pooled
bottleneck features was measured too and dropped: it saw noise and brain size the segmenter
shrugs off, and missed the bias field that cost Dice; BENCHMARKS.md.)"""

RESULT_PATTERNS = (
    "transfer.json",
    "transfer.csv",
    "transfer.md",
    "scores.csv",
    "plots/*.png",
    "segmenter/checkpoints/*.pt",
    "sources/*/segmenter/checkpoints/*.pt",
)
"""What a finished run leaves (a run folder holding any of them is not reused silently)."""


@dataclass
class TransferSettings:
    """Everything ``aad-transfer`` needs besides the cohorts and the encoder.

    Args:
        segmenter: the segmenter's network, training and scoring settings.
        features: encoder feature set of the default AAD, MMD and energy.
        n_permutations: label shuffles per pair for the AAD p-value (reported, not related).
        n_bootstrap: resamples of the cohort means' and scores' intervals.
        correlation_bootstrap: target resamples of the correlation interval and fit band.
        device: where the encoder runs (``auto``, ``cpu``, ``cuda``).
        batch_size: patches per encoder forward pass.
        performance: a CSV ``cohort,subject_id,score`` of the user's model; skips training.
        verify: selection mode: train one segmenter per candidate source and score the ranking.
        seed: seed of splits, training, permutations and bootstraps.
        progress: tqdm bars.
    """

    segmenter: SegmentationSettings = field(default_factory=SegmentationSettings)
    features: str = DEFAULT_FEATURES
    n_permutations: int = 199
    n_bootstrap: int = 500
    correlation_bootstrap: int = 2000
    device: str = "auto"
    batch_size: int = 32
    performance: str | None = None
    verify: bool = False
    seed: int = 0
    progress: bool = False


# ---------------------------------------------------------------------------------------------
# inputs


def check_names(names: Sequence[str]) -> None:
    """Cohort names must be distinct, non-empty and free of path and CSV separators."""
    seen = set()
    for name in names:
        if not name or any(c in name for c in "/\\,\n") or name in (".", ".."):
            raise ConfigError(f"cohort name {name!r} is not usable (no '/', '\\', ',' or empty)")
        if name in seen:
            raise ConfigError(f"cohort name {name!r} is given twice")
        seen.add(name)


def load_named_cohorts(paths: Mapping[str, str | Path]) -> dict[str, Cohort]:
    """Discover and validate every cohort (all problems of one cohort reported together)."""
    from aad_med.data.validation import load_cohort

    return {name: load_cohort(path) for name, path in paths.items()}


def _subset(cohort: Cohort, ids: Sequence[str]) -> Cohort:
    keep = set(ids)
    return replace(cohort, subjects=[s for s in cohort.subjects if s.subject_id in keep])


# ---------------------------------------------------------------------------------------------
# scores


@dataclass
class Scored:
    """What :func:`train_and_score` leaves: the split, per-subject scores, per-region means and
    the segmenter's task features of every scored cohort.

    Attributes:
        train, test: the source's training and held-out records.
        scores: ``{cohort: {subject: score}}`` (the source's held-out subjects under its name).
        regions: ``{cohort: {region: mean Dice, ...}}``.
        features: ``{cohort: {block: (n, F)}}`` (:data:`~aad_med.segmentation.evaluation.TASK_FEATURES`).
    """

    train: list[SubjectRecord]
    test: list[SubjectRecord]
    scores: dict[str, dict[str, float]]
    regions: dict[str, dict[str, float]]
    features: dict[str, dict[str, np.ndarray]]


def train_and_score(
    source: Cohort,
    targets: Mapping[str, Cohort],
    s: TransferSettings,
    run_dir: Path,
    source_name: str,
) -> Scored:
    """Train on the source's training split, score its test split and every target, and pool
    the segmenter's task features of each (the same inference pass)."""
    from aad_med.segmentation import evaluate_cohort, train_segmenter
    from aad_med.segmentation.training import device_for

    seg = s.segmenter
    labelled = [r for r in source.subjects if r.seg is not None]
    train_idx, test_idx = split_train_test(len(labelled), seg.test_fraction, s.seed)
    train = [labelled[i] for i in train_idx]
    test = [labelled[i] for i in test_idx]
    log.info(
        "segmenter: %d training and %d test subjects of %s", len(train), len(test), source_name
    )
    model, _ = train_segmenter(
        train,
        seg,
        run_dir / "segmenter",
        convention=convention_for_layout(source.layout),
        metadata={"source": source_name, "test_subject_ids": [r.subject_id for r in test]},
    )
    device = device_for(seg.device)
    scores: dict[str, dict[str, float]] = {}
    regions: dict[str, dict[str, float]] = {}
    features: dict[str, dict[str, np.ndarray]] = {}
    for name, records, layout in [
        (source_name, test, source.layout),
        *((n, c.subjects, c.layout) for n, c in targets.items()),
    ]:
        result = evaluate_cohort(
            model,
            records,
            seg.preprocessing,
            device,
            convention_for_layout(layout),
            seg.sw_batch_size,
            seg.sw_overlap,
            seg.hd95,
            s.progress,
            task_features=True,
        )
        features[name] = result.features
        score = result.score(seg.score_region)
        scores[name] = dict(zip(result.subject_ids, score.tolist(), strict=True))
        regions[name] = {r: float(result.dice[:, i].mean()) for i, r in enumerate(result.regions)}
        if result.hd95 is not None:
            for i, r in enumerate(result.regions):
                col = result.hd95[:, i]
                regions[name][f"{r}_hd95"] = (
                    float(np.nanmean(col)) if np.isfinite(col).any() else None
                )
        log.info(
            "%s: %s Dice %.3f over %d subjects", name, seg.score_region, score.mean(), len(score)
        )
    return Scored(train, test, scores, regions, features)


# ---------------------------------------------------------------------------------------------
# distances


def pair_distances(
    checkpoint: str | Path,
    reference: Cohort,
    others: Mapping[str, Cohort],
    s: TransferSettings,
    embedded: dict | None = None,
) -> dict[str, dict[str, float | None]]:
    """Every distance of :data:`DISTANCES` (plus the AAD's p-value and interval) between
    ``reference`` and each cohort of ``others``, each pair standardised on its own as
    ``aad-compare`` does.

    ``embedded`` (a dict the caller keeps) holds the embeddings of ``others`` by name across
    calls, so that source selection embeds each target once, not once per candidate source.

    Returns:
        ``{name: {"aad", "aad_unbiased", "aad_p", "aad_ci95", "latent_aad", "mmd", "energy",
        "intensity"}}`` (the segmenter's distances are added by the caller).
    """
    from aad_med.data.intensity import intensity_fingerprint
    from aad_med.distances import aad, compare_embeddings
    from aad_med.embedding.acquisition import standardize_jointly
    from aad_med.embedding.encode import embed_cohort
    from aad_med.embedding.features import get_feature_set
    from aad_med.segmentation.training import device_for
    from aad_med.training.checkpoint import load_model_from_checkpoint

    device = device_for(s.device, "device")
    model, prep, _ = load_model_from_checkpoint(checkpoint, device)
    feature_set = get_feature_set(s.features)

    def embed(cohort: Cohort, name: str):
        return embed_cohort(
            model, cohort, prep, device=device, batch_size=s.batch_size, features=feature_set,
            name=name, progress=s.progress,
        )  # fmt: skip

    ref = embed(reference, "reference")
    # The embedding computes the fingerprint from the volumes it decodes (each file read once).
    ref_fp = (
        ref.fingerprints
        if ref.fingerprints is not None
        else intensity_fingerprint(reference.subjects)
    )
    out = {}
    for name, cohort in others.items():
        if embedded is not None and name in embedded:
            emb = embedded[name]
        else:
            emb = embed(cohort, name)
            if embedded is not None:
                embedded[name] = emb
        pair = feature_set.finalize({"ref": ref.vectors.copy(), "other": emb.vectors.copy()})
        stats = compare_embeddings(
            pair,
            n_permutations=s.n_permutations,
            n_bootstrap=s.n_bootstrap,
            seed=s.seed,
            tests=("aad", "mmd", "energy"),
        )["pairs"][0]
        other_fp = (
            emb.fingerprints
            if emb.fingerprints is not None
            else intensity_fingerprint(cohort.subjects)
        )
        fp = standardize_jointly({"ref": ref_fp, "other": other_fp})
        out[name] = {
            "aad": stats["aad"],
            "aad_unbiased": stats["aad_unbiased"],
            "aad_p": stats["aad_p"],
            "aad_ci95": stats["aad_ci95"],
            "latent_aad": aad(ref.latent_means, emb.latent_means),
            "mmd": stats["mmd2"],
            "energy": stats["energy"],
            "intensity": aad(fp["ref"], fp["other"]),
        }
        log.info("%s: AAD %.4g, latent AAD %.4g", name, out[name]["aad"], out[name]["latent_aad"])
    return out


def segmenter_distances(
    reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray] | None
) -> dict[str, float | None]:
    """The :data:`SEGMENTER_DISTANCES` between two cohorts' task features (each pair z-scored
    jointly, as the intensity fingerprint is; bias-corrected AAD); ``None`` values without
    features or with fewer than 2 subjects on a side.

    Args:
        reference: ``{block: (n_ref, F)}`` of the source's held-out subjects.
        other: the same blocks of the other cohort, or ``None``.
    """
    from aad_med.distances import aad_unbiased
    from aad_med.embedding.acquisition import standardize_jointly

    out: dict[str, float | None] = {}
    for name, block in SEGMENTER_DISTANCES.items():
        if other is None or reference is None or min(len(reference[block]), len(other[block])) < 2:
            out[name] = None  # no segmenter here, or too few subjects for a bias correction
            continue
        z = standardize_jointly({"ref": reference[block], "other": other[block]})
        out[name] = aad_unbiased(z["ref"], z["other"])
    return out


# ---------------------------------------------------------------------------------------------
# transfer


def relate(targets: Sequence[Mapping], s: TransferSettings) -> tuple[dict, dict]:
    """Correlation and monotone fit of every distance with the drop across ``targets``.

    Returns:
        ``(correlations {distance: rank_correlations(...)}, fits {distance: fit dict or None})``.
    """
    from aad_med.distances.transfer import fit_monotone, rank_correlations

    drops = [t["dice_drop"] for t in targets]
    correlations, fits = {}, {}
    for d in DISTANCES:
        values = [t["distances"][d] for t in targets]
        if any(v is None for v in values):
            continue
        correlations[d] = rank_correlations(values, drops, s.correlation_bootstrap, s.seed)
        fits[d] = None
        if len(targets) >= 2:
            fits[d] = fit_monotone(values, drops, s.correlation_bootstrap, s.seed)
    return correlations, fits


def require_segmentations(cohorts: Mapping[str, Cohort]) -> None:
    """Refuse, before any training, cohorts without a single segmentation to train or score on.

    Raises:
        ConfigError: one line per such cohort, naming it and what to do instead.
    """
    bare = [f"{name} ({c.path})" for name, c in cohorts.items() if c.n_with_seg == 0]
    if bare:
        raise ConfigError(
            f"no segmentation (seg) files in {', '.join(bare)}: the segmenter can neither train "
            "nor be scored there; add them, or give your own model's scores with performance=CSV"
        )


def run_transfer(
    checkpoint: str | Path,
    source: tuple[str, str | Path],
    targets: Mapping[str, str | Path],
    run_dir: str | Path,
    settings: TransferSettings | None = None,
) -> dict:
    """Relate every distance from the source to the segmenter's Dice drop on each target.

    Args:
        checkpoint: the encoder checkpoint (written by ``aad-train``).
        source: ``(name, folder or CSV)`` of the cohort the model is trained on.
        targets: ``{name: folder or CSV}``; at least one (three for a correlation).
        run_dir: output folder.
        settings: the rest.

    Returns:
        The ``transfer.json`` payload (also written).

    Raises:
        ConfigError / InputError / CohortError / CheckpointError: bad inputs, before any
            training or writing.
    """
    from aad_med.distances.transfer import drop_interval
    from aad_med.report.transfer import write_transfer_outputs
    from aad_med.segmentation import summarize_scores
    from aad_med.training.checkpoint import load_checkpoint

    s = settings or TransferSettings()
    run_dir = Path(run_dir)
    source_name, source_path = source
    if not targets:
        raise ConfigError("give at least one target: targets.NAME=DIR_OR_CSV")
    check_names([source_name, *targets])
    load_checkpoint(checkpoint)  # fail before minutes of training on an unusable encoder
    check_devices(s)
    src = load_named_cohorts({source_name: source_path})[source_name]
    tgts = load_named_cohorts(targets)
    perf = read_performance(s.performance) if s.performance else None
    if perf is None:
        require_segmentations({source_name: src, **tgts})

    regions: dict = {}
    features: dict = {}
    if perf is not None:
        scores = {
            n: scores_for(perf, n, c, s.performance) for n, c in {source_name: src, **tgts}.items()
        }
        test = [r for r in src.subjects if r.subject_id in scores[source_name]]
        n_train = None
    else:
        scored = train_and_score(src, tgts, s, run_dir, source_name)
        test, scores, regions, features = (
            scored.test,
            scored.scores,
            scored.regions,
            scored.features,
        )
        n_train = len(scored.train)
    test_cohort = _subset(src, [r.subject_id for r in test])
    if len(test_cohort.subjects) < 2:
        raise ConfigError(
            f"the source {source_name!r} has {len(test_cohort.subjects)} held-out subject(s); "
            "at least 2 are needed for the distances (raise segmenter.test_fraction or add "
            "subjects)"
        )
    distances = pair_distances(checkpoint, test_cohort, tgts, s)
    for name in tgts:
        distances[name].update(segmenter_distances(features.get(source_name), features.get(name)))

    src_summary = summarize_scores(list(scores[source_name].values()), s.n_bootstrap, s.seed)
    target_rows = []
    for i, name in enumerate(tgts):
        summ = summarize_scores(list(scores[name].values()), s.n_bootstrap, s.seed + 1 + i)
        d = distances[name]
        target_rows.append(
            {
                "name": name,
                "n": summ["n"],
                "dice_mean": summ["mean"],
                "dice_ci95": summ["ci95"],
                "dice_drop": src_summary["mean"] - summ["mean"],
                "dice_drop_ci95": list(
                    drop_interval(
                        list(scores[source_name].values()),
                        list(scores[name].values()),
                        s.n_bootstrap,
                        s.seed + 1 + i,
                    )
                ),  # fmt: skip
                "distances": {k: d.get(k) for k in DISTANCES},
                "aad_p": d["aad_p"],
                "aad_ci95": d["aad_ci95"],
                "regions": regions.get(name),
            }
        )
    correlations, fits = relate(target_rows, s)
    result = {
        "mode": "transfer",
        "source": {
            "name": source_name,
            "path": str(Path(source_path).resolve()),
            "n_train": n_train,
            "n_test": src_summary["n"],
            "dice_mean": src_summary["mean"],
            "dice_ci95": src_summary["ci95"],
            "regions": regions.get(source_name),
        },
        "targets": target_rows,
        "correlations": correlations,
        "fits": {k: (f.to_dict() if f is not None else None) for k, f in fits.items()},
        "score": {
            "name": "dice" if perf is None else "score",
            "region": s.segmenter.score_region if perf is None else None,
            "from": "segmenter trained here" if perf is None else "performance file",
        },
        "settings": settings_record(s, checkpoint),
    }
    write_transfer_outputs(run_dir, result, scores, fits)
    return result


def check_devices(s: TransferSettings) -> None:
    """Fail on an unusable device before cohorts are read or anything is trained."""
    from aad_med.segmentation.training import device_for

    device_for(s.device, "device")
    if s.performance is None or s.verify:
        device_for(s.segmenter.device)


def settings_record(s: TransferSettings, checkpoint) -> dict:
    seg = s.segmenter
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "features": s.features,
        "seed": s.seed,
        "n_permutations": s.n_permutations,
        "n_bootstrap": s.n_bootstrap,
        "correlation_bootstrap": s.correlation_bootstrap,
        "performance": s.performance,
        "segmenter": {
            "network": seg.network.to_dict(),
            "patch_size": seg.patch_size,
            "max_epochs": seg.max_epochs,
            "test_fraction": seg.test_fraction,
            "score_region": seg.score_region,
        },
    }
