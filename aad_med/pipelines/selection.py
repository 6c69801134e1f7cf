"""Source selection for ``aad-transfer target=DIR sources.NAME=DIR ...``: which candidate
training cohort is closest to a target, by every distance of
:data:`aad_med.pipelines.transfer.DISTANCES`; with ``verify`` one segmenter per source checks
whether the closest source really scores best on the target (top-1, strict and within the
sampling noise of the target's subjects) and how the distance ranking correlates with the
achieved Dice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from aad_med.errors import ConfigError
from aad_med.pipelines.transfer import (
    DISTANCES,
    TransferSettings,
    check_devices,
    check_names,
    load_named_cohorts,
    pair_distances,
    segmenter_distances,
    settings_record,
    train_and_score,
)


def run_selection(
    checkpoint: str | Path,
    target: tuple[str, str | Path],
    sources: Mapping[str, str | Path],
    run_dir: str | Path,
    settings: TransferSettings | None = None,
) -> dict:
    """Rank candidate sources for one target by every distance; with ``settings.verify`` train a
    segmenter per source (on its training split) and check the rankings against the Dice each
    achieves on the target.

    Returns:
        The ``transfer.json`` payload of mode ``selection`` (also written).
    """
    from aad_med.distances.transfer import rank_sources, selection_agreement
    from aad_med.report.transfer import write_selection_outputs
    from aad_med.training.checkpoint import load_checkpoint

    s = settings or TransferSettings()
    run_dir = Path(run_dir)
    target_name, target_path = target
    if len(sources) < 2:
        raise ConfigError("give at least two candidate sources: sources.NAME=DIR_OR_CSV")
    check_names([target_name, *sources])
    load_checkpoint(checkpoint)
    check_devices(s)
    tgt = load_named_cohorts({target_name: target_path})[target_name]
    srcs = load_named_cohorts(sources)
    # Distance of the target to each whole source: the data a model would be trained on.
    per_source = {}
    embedded: dict = {}  # the target is embedded once for all sources
    for name, cohort in srcs.items():
        per_source[name] = pair_distances(checkpoint, cohort, {target_name: tgt}, s, embedded)[
            target_name
        ]
    rows = [
        {
            "name": n,
            "n": len(srcs[n].subjects),
            "distances": {k: per_source[n].get(k) for k in DISTANCES},
        }
        for n in srcs
    ]
    result: dict = {
        "mode": "selection",
        "target": {
            "name": target_name,
            "n": len(tgt.subjects),
            "path": str(Path(target_path).resolve()),
        },
        "sources": rows,
        "rankings": {},
        "verified": bool(s.verify),
        "settings": settings_record(s, checkpoint),
    }
    on_target: dict[str, dict[str, float]] = {}  # per subject: the paired bootstrap of ties
    if s.verify:
        for row in rows:
            name = row["name"]
            scored = train_and_score(
                srcs[name], {target_name: tgt}, s, run_dir / "sources" / name, name
            )
            scores = scored.scores
            # the task-aware distances exist once this source's segmenter does
            row["distances"].update(
                segmenter_distances(scored.features[name], scored.features[target_name])
            )
            row["dice_on_target"] = float(np.mean(list(scores[target_name].values())))
            row["dice_own_test"] = float(np.mean(list(scores[name].values())))
            on_target[name] = dict(scores[target_name])
    known = [d for d in DISTANCES if all(r["distances"][d] is not None for r in rows)]
    result["rankings"] = {
        d: rank_sources({r["name"]: r["distances"][d] for r in rows}) for d in known
    }
    if s.verify:
        achieved = {r["name"]: r["dice_on_target"] for r in rows}
        result["selection"] = {
            d: selection_agreement(
                {r["name"]: r["distances"][d] for r in rows},
                achieved,
                on_target,
                s.n_bootstrap,
                s.seed,
            )
            for d in known
        }
    write_selection_outputs(run_dir, result)
    return result


def selection_suite(
    checkpoint: str | Path,
    sources: Mapping[str, str | Path],
    targets: Mapping[str, str | Path],
    run_dir: str | Path,
    settings: TransferSettings | None = None,
) -> dict:
    """Source selection over several targets at once: one segmenter per source (trained once,
    scored on every target), every distance source → target, and per distance the share of
    targets whose closest source scored best (top-1) and the mean rank correlation.

    Returns:
        ``{"dice": {source: {target: mean score}}, "distances": {source: {target: {...}}},
        "dice_subjects": {source: {target: {subject: score}}}, "per_target": {distance:
        {target: selection_agreement}}, "summary": {distance: {"top1_rate",
        "top1_within_noise_rate", "regret_mean", "spearman_mean", "n_targets"}}}``. Strict top-1
        counts a miss however small; within noise, a miss whose paired bootstrap interval of
        Dice(best) − Dice(chosen) over the target's subjects holds 0 counts as a hit.
        ``"chance": {"top1_rate", "top1_within_noise_rate", "tied_with_best": {target:
        [sources]}}`` is what a random pick of a source would score.
    """
    from aad_med.distances.transfer import selection_agreement, tied_with_best, top1_hit_rate
    from aad_med.pipelines.transfer import require_segmentations

    s = settings or TransferSettings()
    run_dir = Path(run_dir)
    if len(sources) < 2 or not targets:
        raise ConfigError("source selection needs at least two sources and one target")
    check_names([*sources, *targets])
    check_devices(s)
    srcs = load_named_cohorts(sources)
    tgts = load_named_cohorts(targets)
    require_segmentations({**srcs, **tgts})
    dice: dict[str, dict[str, float]] = {}
    dice_subjects: dict[str, dict[str, dict[str, float]]] = {}
    distances: dict[str, dict] = {}
    embedded: dict = {}  # each target is embedded once for all sources
    for name, cohort in srcs.items():
        scored = train_and_score(cohort, tgts, s, run_dir / "sources" / name, name)
        dice[name] = {t: float(np.mean(list(scored.scores[t].values()))) for t in tgts}
        # per subject: every source's model scores the same target subjects (a paired design)
        dice_subjects[name] = {t: dict(scored.scores[t]) for t in tgts}
        distances[name] = pair_distances(checkpoint, cohort, tgts, s, embedded)
        for t in tgts:
            distances[name][t].update(
                segmenter_distances(scored.features[name], scored.features[t])
            )
    per_target: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for d in DISTANCES:
        if any(distances[src][t][d] is None for src in srcs for t in tgts):
            continue  # a segmenter distance without enough held-out subjects
        per_target[d] = {
            t: selection_agreement(
                {src: distances[src][t][d] for src in srcs},
                {src: dice[src][t] for src in srcs},
                {src: dice_subjects[src][t] for src in srcs},
                s.n_bootstrap,
                s.seed + i,
            )
            for i, t in enumerate(tgts)
        }
        verdicts = list(per_target[d].values())
        rhos = [a["spearman"] for a in verdicts if a["spearman"] is not None]
        summary[d] = {
            "top1_rate": top1_hit_rate(verdicts),
            "top1_within_noise_rate": top1_hit_rate(verdicts, "top1_within_noise"),
            "regret_mean": float(np.mean([a["regret"] for a in per_target[d].values()])),
            "spearman_mean": float(np.mean(rhos)) if rhos else None,
            "n_targets": len(tgts),
        }
    # What a random pick scores, strict and within noise: the level a distance must beat.
    tied = [
        tied_with_best(
            {src: dice[src][t] for src in srcs},
            {src: dice_subjects[src][t] for src in srcs},
            s.n_bootstrap,
            s.seed + i,
        )
        for i, t in enumerate(tgts)
    ]
    best_share = [
        sum(dice[src][t] >= max(dice[x][t] for x in srcs) for src in srcs) / len(srcs) for t in tgts
    ]
    chance = {
        "top1_rate": float(np.mean(best_share)),
        "top1_within_noise_rate": float(np.mean([len(x) / len(srcs) for x in tied])),
        "tied_with_best": dict(zip(tgts, tied, strict=True)),
    }
    return {
        "dice": dice,
        "chance": chance,
        "dice_subjects": dice_subjects,
        "distances": distances,
        "per_target": per_target,
        "summary": summary,
    }
