"""Writers of ``aad-transfer``'s results: ``transfer.json``, ``transfer.csv``, ``scores.csv``,
one scatter plot per distance and ``transfer.md`` in plain words. The numbers come from
:mod:`aad_med.pipelines.transfer`; nothing is computed here beyond wording."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med.report.serialize import write_json, write_table_csv

LABELS: dict[str, str] = {
    "aad": "AAD",
    "aad_unbiased": "bias-corrected AAD",
    "latent_aad": "latent AAD",
    "mmd": "MMD²",
    "energy": "energy distance",
    "intensity": "intensity fingerprint distance",
    "confidence_aad": "segmenter-confidence AAD",
}
"""How each distance is named in prose and on axes."""

MEANINGS: dict[str, str] = {
    "aad": "the Autoencoder Average Distance of the default encoder features",
    "latent_aad": "the seed's AAD, on the mean patch latents",
    "mmd": "the squared maximum mean discrepancy of the default features",
    "energy": "the energy distance of the default features",
    "intensity": "the AAD of the raw per-channel intensity percentiles (before normalisation)",
    "aad_unbiased": "the AAD with its sampling-noise floor removed (0 when below it)",
    "confidence_aad": "the bias-corrected AAD of the segmenter's per-region confidence around its "
    "predicted boundary",
}


def _cell(value) -> str:
    """A CSV cell: the exact float, or empty for a distance not computed in this mode."""
    return "" if value is None else repr(value)


def _strength(rho: float) -> str:
    a = abs(rho)
    if a >= 0.8:
        return "strongly"
    if a >= 0.5:
        return "moderately"
    if a >= 0.3:
        return "weakly"
    return "hardly"


def correlation_sentence(name: str, corr: Mapping, n: int) -> str:
    """One sentence on how well a distance ordered the targets' drops."""
    label = LABELS.get(name, name)
    if corr.get("spearman") is None:
        return f"The {label} cannot be correlated with the drop here ({n} target(s), or a constant side)."
    rho = corr["spearman"]
    ci = corr.get("spearman_ci95")
    ci_txt = f" (95% interval {ci[0]:.2f} to {ci[1]:.2f})" if ci else ""
    direction = "a larger drop" if rho > 0 else "a smaller drop"
    return (
        f"Across {n} targets, a larger {label} {_strength(rho)} went with {direction}: "
        f"Spearman ρ = {rho:.2f}{ci_txt}, Kendall τ = {corr['kendall']:.2f}."
    )


def fit_sentence(name: str, fit: Mapping, distance: float, score: str, source: str) -> str:
    """'An AAD of 0.8 from this source has come with a Dice drop of 0.05–0.12' for one value."""
    gx = np.asarray(fit["grid_distance"], dtype=np.float64)
    band = np.asarray(fit["grid_interval95"], dtype=np.float64).reshape(-1, 2)
    lo = float(np.interp(distance, gx, band[:, 0]))
    hi = float(np.interp(distance, gx, band[:, 1]))
    mid = float(np.interp(distance, gx, fit["grid_drop"]))
    label = LABELS.get(name, name)
    article = "An" if label[0] in "AEIOUaeiou" or label.startswith("MMD") else "A"
    return (
        f"{article} {label} of {distance:.3g} from {source} has come with a {score} drop "
        f"of {lo:.2f} to {hi:.2f} (fitted {mid:.2f})."
    )


def misses(targets: Sequence[Mapping], name: str, fit: Mapping, k: int = 2) -> list[str]:
    """The ``k`` targets farthest from the fit, worded: where a distance fails."""
    gx = np.asarray(fit["grid_distance"], dtype=np.float64)
    rows = []
    for t in targets:
        d = t["distances"][name]
        pred = float(np.interp(d, gx, fit["grid_drop"]))
        rows.append((abs(t["dice_drop"] - pred), t["name"], t["dice_drop"], pred, d))
    rows.sort(reverse=True)
    out = []
    for _, tname, drop, pred, d in rows[:k]:
        verb = "lost more than" if drop > pred else "lost less than"
        out.append(
            f"{tname} ({LABELS.get(name, name)} {d:.3g}) {verb} the fit says: drop {drop:.2f}, fit {pred:.2f}"
        )
    return out


def transfer_markdown(result: Mapping) -> str:
    """The plain-words section of a transfer run."""
    src = result["source"]
    targets = result["targets"]
    score = "Dice" if result["score"]["name"] == "dice" else "score"
    lines = ["## Transferability", ""]
    origin = result["score"]["from"]
    region = result["score"].get("region")
    lines.append(
        f"Source **{src['name']}**: {score}{' (' + region + ')' if region else ''} "
        f"{src['dice_mean']:.3f} (95% interval {src['dice_ci95'][0]:.3f} to "
        f"{src['dice_ci95'][1]:.3f}) on {src['n_test']} held-out subjects; scores from the "
        f"{origin}."
    )
    lines += [
        "",
        "| target | n | "
        + score
        + " [95% CI] | drop | "
        + " | ".join(LABELS[d] for d in LABELS)
        + " |",
    ]
    lines.append("|" + "---|" * (4 + len(LABELS)))
    for t in targets:
        ci = t["dice_ci95"]
        dist = " | ".join(
            "n/a" if t["distances"].get(d) is None else f"{t['distances'][d]:.3g}" for d in LABELS
        )
        lines.append(
            f"| {t['name']} | {t['n']} | {t['dice_mean']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
            f"{t['dice_drop']:+.3f} | {dist} |"
        )
    lines.append("")
    same = [t["name"] for t in targets if t.get("within_source_ci95")]
    if same:
        lines.append(
            f"Targets whose mean {score} lies inside the source's own interval (no measurable "
            f"loss): {', '.join(same)}."
        )
        lines.append("")
    corr = result["correlations"]
    ranked = sorted(
        (d for d in corr if corr[d].get("spearman") is not None),
        key=lambda d: -corr[d]["spearman"],
    )
    if ranked:
        lines.append(
            f"Best predictor of the drop here: the {LABELS[ranked[0]]} "
            f"(ρ = {corr[ranked[0]]['spearman']:.2f})."
        )
        lines.append("")
    for d in corr:
        lines.append(
            f"- **{LABELS[d]}** ({MEANINGS[d]}): {correlation_sentence(d, corr[d], len(targets))}"
        )
        fit = result["fits"].get(d)
        if fit is not None:
            values = sorted(t["distances"][d] for t in targets)
            at = float(np.median(values))
            lines.append(f"  {fit_sentence(d, fit, at, score, 'this source')}")
            lines.append("  Farthest from the fit: " + "; ".join(misses(targets, d, fit)) + ".")
    lines += [
        "",
        "The prediction interval covers the curve's uncertainty (targets resampled) and how far "
        "single cohorts scattered around it; outside the distances seen here the fit is held "
        "flat, so it cannot foresee a larger loss than the largest one observed.",
        "",
    ]
    return "\n".join(lines)


def write_transfer_outputs(
    run_dir: str | Path,
    result: dict,
    scores: Mapping[str, Mapping[str, float]],
    fits: Mapping,
) -> None:
    """``transfer.json``, ``transfer.csv``, ``scores.csv``, ``plots/`` and ``transfer.md``."""
    from aad_med.plots.transfer import plot_drop_vs_distance

    run_dir = Path(run_dir)
    src = result["source"]
    lo, hi = src["dice_ci95"]
    for t in result["targets"]:
        t["within_source_ci95"] = bool(lo <= t["dice_mean"] <= hi)
    score = "Dice" if result["score"]["name"] == "dice" else "score"
    names = [t["name"] for t in result["targets"]]
    plots = {}
    for d, corr in result["correlations"].items():
        values = [t["distances"][d] for t in result["targets"]]
        drops = [t["dice_drop"] for t in result["targets"]]
        drop_ci = [
            [src["dice_mean"] - t["dice_ci95"][1], src["dice_mean"] - t["dice_ci95"][0]]
            for t in result["targets"]
        ]
        fit = result["fits"].get(d)
        path = run_dir / "plots" / f"drop_vs_{d}.png"
        plot_drop_vs_distance(names, values, drops, drop_ci, fit, path, LABELS[d], score, corr)
        plots[d] = str(path.relative_to(run_dir))
    result["plots"] = plots
    header = ["target", "n", "dice_mean", "dice_ci95_lo", "dice_ci95_hi", "dice_drop", *LABELS]
    rows = [
        [t["name"], t["n"], repr(t["dice_mean"]), repr(t["dice_ci95"][0]), repr(t["dice_ci95"][1]),
         repr(t["dice_drop"]), *(_cell(t["distances"].get(d)) for d in LABELS)]
        for t in result["targets"]
    ]  # fmt: skip
    write_table_csv(run_dir / "transfer.csv", header, rows)
    write_table_csv(
        run_dir / "scores.csv",
        ["cohort", "subject_id", "score"],
        [[c, sid, repr(float(v))] for c, per in scores.items() for sid, v in per.items()],
    )
    md = transfer_markdown(result)
    md += "\n" + "\n".join(f"![{LABELS[d]}]({p})" for d, p in plots.items()) + "\n"
    tmp = run_dir / ".transfer.md.tmp"
    tmp.write_text(md, encoding="utf-8")
    tmp.replace(run_dir / "transfer.md")
    write_json(run_dir / "transfer.json", result)


def _verdict(sel: Mapping, n_subjects: int) -> str:
    """A selection verdict in words: a hit, a miss within the sampling noise, or a real loss."""
    if sel["top1"]:
        return "the best"
    text = f"not the best: {sel['regret']:.4f} Dice below {sel['best']}"
    ci = sel.get("regret_ci95")
    if ci is None:
        return text
    text += f", 95% interval {ci[0]:+.4f} to {ci[1]:+.4f} over the {n_subjects} target subjects"
    if sel.get("top1_within_noise"):
        return text + ": a tie within the sampling noise"
    return text + ": a real loss"


def selection_markdown(result: Mapping) -> str:
    """The plain-words section of a source-selection run."""
    tgt = result["target"]
    lines = ["## Source selection", "", f"Target **{tgt['name']}** ({tgt['n']} subjects).", ""]
    for d, order in result["rankings"].items():
        lines.append(f"- closest first by {LABELS[d]}: {', '.join(order)}")
    if result.get("selection"):
        lines.append("")
        dice = {r["name"]: r["dice_on_target"] for r in result["sources"]}
        best = max(dice, key=dice.get)
        lines.append(
            f"Trained and checked: {best} gave the best Dice on the target ({dice[best]:.3f})."
        )
        for d, sel in result["selection"].items():
            rho = "n/a" if sel["spearman"] is None else f"{sel['spearman']:.2f}"
            lines.append(
                f"- {LABELS[d]}: picked {sel['ranking'][0]} ({_verdict(sel, tgt['n'])}); "
                f"rank correlation {rho}"
            )
    else:
        lines += ["", "Not verified (verify=true trains one segmenter per source to check)."]
    return "\n".join(lines) + "\n"


def write_selection_outputs(run_dir: str | Path, result: dict) -> None:
    """``transfer.json``, ``transfer.csv`` and ``transfer.md`` of a selection run."""
    run_dir = Path(run_dir)
    header = ["source", "n", *LABELS, "dice_on_target"]
    rows = [
        [
            r["name"],
            r["n"],
            *(_cell(r["distances"].get(d)) for d in LABELS),
            repr(r.get("dice_on_target")),
        ]
        for r in result["sources"]
    ]
    write_table_csv(run_dir / "transfer.csv", header, rows)
    tmp = run_dir / ".transfer.md.tmp"
    tmp.write_text(selection_markdown(result), encoding="utf-8")
    tmp.replace(run_dir / "transfer.md")
    write_json(run_dir / "transfer.json", result)
