"""Transferability benchmark: does a larger distance mean a larger loss of Dice for a real
segmentation model? (issue 16; the command is ``aad-transfer``, this script runs it on a suite).

A source cohort (the synthetic reference site) trains a MONAI UNet on whole tumour, tumour core
and enhancing tumour; the suite's target cohorts are the reference site with one acquisition
shift (noise, blur, through-plane resolution, gamma, bias field, global intensity scale) or
population shift (tumour size, brain size) at graded severities, plus same-site targets. Every
target shares its anatomy seed with the others (a paired design: targets differ only by their
shift); same-site targets have independent anatomy. Each run goes through
:func:`aad_med.pipelines.transfer.run_transfer` (the body of ``aad-transfer``) and the script
summarises, per distance, the Spearman correlation with the Dice drop and its interval, which
distance predicts best, where each fails, and whether same-site targets stay inside the
source's own interval.

    python scripts/transferability.py --out bench/transfer [--checkpoint ENC.pt] \\
        [--shape 48 48 48] [--source-subjects 16] [--target-subjects 8] [--epochs 20] \\
        [--seeds 0 1] [--threads 2]
    python scripts/transferability.py --quick --out /tmp/transfer   # tiny: plumbing only

Without ``--checkpoint`` an encoder is trained first (``--encoder-epochs``, the project's loop)
on a separate reference cohort (seed 99). Writes ``transferability.json``, ``.csv`` and ``.md``
(a BENCHMARKS.md section) into ``--out`` (with ``--selection`` also
``transferability_selection.csv``: one verdict per distance and target), and each seed's
``aad-transfer`` outputs in ``--out/seed<N>/``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.synthetic import SITES, generate_cohort
from aad_med.data.validation import load_cohort
from aad_med.examples import quick_model
from aad_med.pipelines.transfer import DISTANCES, TransferSettings, run_transfer
from aad_med.report.serialize import write_json, write_table_csv
from aad_med.report.transfer import LABELS, misses
from aad_med.segmentation.network import SegmenterConfig
from aad_med.segmentation.training import SegmentationSettings
from aad_med.training.checkpoint import save_model_checkpoint

REFERENCE = SITES["reference"]

# name -> (kind, changes to the reference site, anatomy seed)
TARGETS: dict[str, tuple[str, dict, int]] = {
    "same_site_1": ("same site", {}, 1),
    "same_site_2": ("same site", {}, 2),
    "noise_0.06": ("noise", {"noise": 0.06}, 1),
    "noise_0.12": ("noise", {"noise": 0.12}, 1),
    "noise_0.20": ("noise", {"noise": 0.20}, 1),
    "blur_0.8": ("blur", {"blur_sigma": 0.8}, 1),
    "blur_1.5": ("blur", {"blur_sigma": 1.5}, 1),
    "blur_2.5": ("blur", {"blur_sigma": 2.5}, 1),
    "slices_2mm": ("resolution", {"downsample": (1.0, 1.0, 2.0)}, 1),
    "slices_4mm": ("resolution", {"downsample": (1.0, 1.0, 4.0)}, 1),
    "gamma_1.3": ("gamma", {"gamma": 1.3}, 1),
    "gamma_1.8": ("gamma", {"gamma": 1.8}, 1),
    "bias_0.2": ("bias field", {"bias_field": 0.2}, 1),
    "bias_0.5": ("bias field", {"bias_field": 0.5}, 1),
    "scale_1.5": ("global scale", {"scale": 1.5}, 1),
    "scale_3": ("global scale", {"scale": 3.0}, 1),
    "tumour_0.6": ("tumour size", {"tumour_size": 0.6}, 1),
    "tumour_1.6": ("tumour size", {"tumour_size": 1.6}, 1),
    "brain_0.85": ("brain size", {"brain_size": 0.85}, 1),
    "brain_1.15": ("brain size", {"brain_size": 1.15}, 1),
}
# Candidate training cohorts for the source-selection check (``--selection``): the reference
# scanner and three shifted ones, each with its own subjects (anatomy seed 5).
SELECTION_SOURCES: dict[str, dict] = {
    "src_reference": {},
    "src_noise": {"noise": 0.12},
    "src_blur": {"blur_sigma": 1.5},
    "src_slices": {"downsample": (1.0, 1.0, 4.0)},
}
QUICK_TARGETS = (
    "same_site_1", "noise_0.12", "noise_0.20", "blur_1.5", "blur_2.5", "slices_4mm",
    "gamma_1.8", "bias_0.5", "scale_3", "tumour_0.6", "tumour_1.6", "brain_0.85",
)  # fmt: skip


def untrained_encoder(path: Path) -> Path:
    """A tiny untrained encoder on 8³ patches (``--quick``: the plumbing, not the science)."""
    return save_model_checkpoint(path, quick_model(), PreprocessingConfig(patch_size=8).to_dict())


def train_encoder(folder: Path, out: Path, patch: int, epochs: int, seed: int = 0) -> Path:
    """Train the project's autoencoder on the cohort in ``folder`` with the project's loop."""
    from aad_med.data.datasets import build_train_dataset, train_collate
    from aad_med.models import ConvAutoencoder
    from aad_med.training.distributed import DistInfo
    from aad_med.training.loop import Trainer, TrainSettings, seed_everything

    prep = PreprocessingConfig(patch_size=patch)
    records = load_cohort(folder).subjects
    ds = build_train_dataset(records, prep, samples_per_subject=16, cache="memory", seed=seed)
    seed_everything(seed)
    model = ConvAutoencoder(channels=(16, 32, 64), strides=(2, 2, 2), latent_dim=32,
                            patch_size=patch)  # fmt: skip
    trainer = Trainer(
        TrainSettings(max_epochs=epochs, batch_size=16, seed=seed, progress=False),
        model,
        lambda p: torch.optim.AdamW(p, lr=1e-3),
        ds,
        None,
        train_collate,
        16,
        out,
        DistInfo(0, 1, 0, torch.device("cpu")),
        metadata={
            "preprocessing": prep.to_dict(),
            "train_subject_ids": [r.subject_id for r in records],
        },
    )
    result = trainer.fit()
    print(
        f"encoder: {epochs} epochs, final loss {result.history[-1]['train_loss']:.4f}", flush=True
    )
    return out / "checkpoints" / "last.pt"


def build_data(args, root: Path, names) -> tuple[Path, dict[str, Path]]:
    shape = tuple(args.shape)
    source = root / "source"
    if not source.exists():
        generate_cohort(source, args.source_subjects, REFERENCE, 0, shape)
    targets = {}
    for name in names:
        _, changes, seed = TARGETS[name]
        folder = root / name
        if not folder.exists():
            site = REFERENCE.with_updates(name=name, **changes)
            # start_index beyond the source's subjects: never the same subjects as the source
            generate_cohort(folder, args.target_subjects, site, seed, shape, start_index=1000)
        targets[name] = folder
    return source, targets


def settings_for(args, seed: int) -> TransferSettings:
    if args.quick:
        net = SegmenterConfig(channels=(8, 16, 32), strides=(2, 2), num_res_units=0)
        seg = SegmentationSettings(network=net, patch_size=16, max_epochs=args.epochs,
                                   samples_per_subject=2, device="cpu", progress=False,
                                   test_fraction=0.5, seed=seed)  # fmt: skip
        return TransferSettings(segmenter=seg, n_permutations=19, n_bootstrap=50,
                                correlation_bootstrap=200, device="cpu", seed=seed)  # fmt: skip
    seg = SegmentationSettings(
        patch_size=args.patch, max_epochs=args.epochs, samples_per_subject=args.samples,
        batch_size=8, device=args.device, progress=False, test_fraction=args.test_fraction,
        seed=seed,
    )  # fmt: skip
    return TransferSettings(segmenter=seg, n_permutations=199, n_bootstrap=1000,
                            correlation_bootstrap=2000, device=args.device, seed=seed)  # fmt: skip


def summarise(runs: dict[int, dict]) -> dict:
    """Per distance: each seed's correlation and the mean over seeds; best distance; misses;
    the same-site check."""
    per_distance = {}
    for d in DISTANCES:
        if not any(d in r["correlations"] for r in runs.values()):
            continue
        rows = [r["correlations"].get(d, {}) for r in runs.values()]
        rhos = [c.get("spearman") for c in rows if c.get("spearman") is not None]
        per_distance[d] = {
            "spearman_by_seed": [c.get("spearman") for c in rows],
            "spearman_ci95_by_seed": [c.get("spearman_ci95") for c in rows],
            "kendall_by_seed": [c.get("kendall") for c in rows],
            "spearman_mean": float(np.mean(rhos)) if rhos else None,
            "misses": [
                misses(r["targets"], d, r["fits"][d], k=3) if r["fits"].get(d) else []
                for r in runs.values()
            ],
        }
    scored = [d for d in per_distance if per_distance[d]["spearman_mean"] is not None]
    best = max(scored, key=lambda d: per_distance[d]["spearman_mean"]) if scored else None
    # The check (target mean inside the source's own interval) and the two-sample one
    # (the drop's own interval holds 0).
    same_site = [
        {"seed": s, "target": t["name"], "dice_drop": t["dice_drop"],
         "dice_drop_ci95": t.get("dice_drop_ci95"),
         "source_ci95": r["source"]["dice_ci95"],
         "within_source_ci95": t["within_source_ci95"],
         "drop_ci_holds_zero": (
             None if t.get("dice_drop_ci95") is None
             else bool(t["dice_drop_ci95"][0] <= 0 <= t["dice_drop_ci95"][1])
         )}
        for s, r in runs.items() for t in r["targets"] if TARGETS[t["name"]][0] == "same site"
    ]  # fmt: skip
    return {"distances": per_distance, "best": best, "same_site": same_site}


def markdown(result: dict) -> str:
    a = result["args"]
    runs = result["runs"]
    summ = result["summary"]
    seeds = list(runs)
    first = runs[seeds[0]]
    lines = [
        "## Transferability: does the AAD predict the Dice drop? (issue 16)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Source: synthetic reference site, {a['source_subjects']} subjects "
        f"({first['source']['n_train']} train / {first['source']['n_test']} test), volumes "
        f"{'x'.join(map(str, a['shape']))}; {len(first['targets'])} targets of "
        f"{a['target_subjects']} subjects. Segmenter: MONAI UNet (WT/TC/ET, sigmoid, Dice+CE), "
        f"patch {first['settings']['segmenter']['patch_size']}, "
        f"{first['settings']['segmenter']['max_epochs']} epochs; score = WT Dice. Encoder: "
        f"{result['encoder']}. Wall time {result['seconds']:.0f} s on {result['device']}.",
        "",
        f"Distances of seed {seeds[0]}; drops of every seed.",
        "",
        "| target | kind | "
        + " | ".join(f"Dice drop (seed {s})" for s in seeds)
        + " | "
        + " | ".join(LABELS[d] for d in DISTANCES)
        + " |",
        "|" + "---|" * (2 + len(seeds) + len(DISTANCES)),
    ]
    for i, t in enumerate(first["targets"]):
        drops = " | ".join(f"{runs[s]['targets'][i]['dice_drop']:+.3f}" for s in seeds)
        dist = " | ".join(
            "n/a" if t["distances"].get(d) is None else f"{t['distances'][d]:.3g}"
            for d in DISTANCES
        )
        lines.append(f"| {t['name']} | {TARGETS[t['name']][0]} | {drops} | {dist} |")
    lines += [
        "",
        "| distance | mean ρ | Spearman ρ [95% CI] per seed | Kendall τ per seed |",
        "|---|---|---|---|",
    ]
    for d in summ["distances"]:
        s = summ["distances"][d]
        rho = "; ".join(
            "n/a" if r is None else f"{r:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r:.2f}"
            for r, ci in zip(s["spearman_by_seed"], s["spearman_ci95_by_seed"], strict=True)
        )
        tau = "; ".join("n/a" if t is None else f"{t:.2f}" for t in s["kendall_by_seed"])
        mean = "n/a" if s["spearman_mean"] is None else f"{s['spearman_mean']:.2f}"
        lines.append(f"| {LABELS[d]} | {mean} | {rho} | {tau} |")
    lines += [
        "",
        f"Best predictor (mean ρ over seeds): **{LABELS.get(summ['best'], summ['best'])}**.",
        "",
    ]
    for d in summ["distances"]:
        m = summ["distances"][d]["misses"]
        if m and m[0]:
            lines.append(
                f"- {LABELS[d]}, farthest from its fit (seed {seeds[0]}): " + "; ".join(m[0])
            )
    inside = [x for x in summ["same_site"] if x["within_source_ci95"]]
    zero = [x for x in summ["same_site"] if x["drop_ci_holds_zero"]]
    lines += [
        "",
        f"Same-site targets inside the source's own 95% Dice interval: {len(inside)} of "
        f"{len(summ['same_site'])}; whose drop interval (both cohorts resampled) holds 0: "
        f"{len(zero)} of {len(summ['same_site'])}.",
        "",
        "| seed | target | drop [95% CI] | source Dice 95% CI | inside source CI |",
        "|---|---|---|---|---|",
    ]
    for x in summ["same_site"]:
        ci = x["dice_drop_ci95"]
        src = x["source_ci95"]
        lines.append(
            f"| {x['seed']} | {x['target']} | {x['dice_drop']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] "
            f"| [{src[0]:.3f}, {src[1]:.3f}] | {'yes' if x['within_source_ci95'] else 'no'} |"
        )
    lines.append("")
    return "\n".join(lines)


def run_selection_check(args, out: Path, encoder: Path, targets: dict[str, Path]) -> dict:
    """One segmenter per candidate source, scored on every target: does the closest source (by
    each distance) give the best Dice?"""
    from aad_med.pipelines.selection import selection_suite

    shape = tuple(args.shape)
    sources = {}
    for name, changes in SELECTION_SOURCES.items():
        folder = out / "data" / name
        if not folder.exists():
            site = REFERENCE.with_updates(name=name, **changes)
            generate_cohort(folder, args.selection_subjects, site, 5, shape, start_index=2000)
        sources[name] = folder
    settings = settings_for(args, args.seeds[0])
    settings.segmenter.test_fraction = max(
        args.selection_test_fraction, 2 / args.selection_subjects
    )
    # Every target of the suite: each source's segmenter is trained once and scored on all.
    return selection_suite(encoder, sources, targets, out / "selection", settings)


def selection_markdown(sel: dict) -> str:
    lines = [
        "",
        "### Source selection",
        "",
        f"Candidate sources: {', '.join(sel['dice'])} (one segmenter each, same settings); "
        f"{len(next(iter(sel['dice'].values())))} targets.",
        "",
        "Strict top-1: the closest source scored the best mean Dice. Within noise: it did, or "
        "the paired bootstrap interval of Dice(best) − Dice(chosen) over the target's subjects "
        "(every source's model scores the same subjects) holds 0.",
        "",
        "| distance | strict top-1 (closest source scored best) | top-1 within noise | "
        "mean regret (Dice) | mean rank correlation |",
        "|---|---|---|---|---|",
    ]
    for d, row in sel["summary"].items():
        rho = "n/a" if row["spearman_mean"] is None else f"{row['spearman_mean']:.2f}"
        noise = row.get("top1_within_noise_rate")
        lines.append(
            f"| {LABELS[d]} | {row['top1_rate']:.0%} of {row['n_targets']} | "
            f"{'n/a' if noise is None else f'{noise:.0%}'} | {row['regret_mean']:.3f} | {rho} |"
        )
    chance = sel.get("chance")
    if chance:
        lines.append(
            f"| *a random pick (chance)* | {chance['top1_rate']:.0%} | "
            f"{chance['top1_within_noise_rate']:.0%} | | |"
        )
    for d, verdicts in sel["per_target"].items():
        missed = [
            f"{t} (picked {v['ranking'][0]}, {v['best']} +{v['regret']:.4f} "
            f"[{v['regret_ci95'][0]:+.4f}, {v['regret_ci95'][1]:+.4f}]"
            f"{', within noise' if v['top1_within_noise'] else ''})"
            for t, v in verdicts.items()
            if not v["top1"] and v.get("regret_ci95") is not None
        ]
        if missed:
            lines += [
                "",
                f"Misses of {LABELS[d]} (regret [95% paired interval]): " + "; ".join(missed),
            ]
    targets = list(next(iter(sel["dice"].values())))
    lines += [
        "",
        "| target | " + " | ".join(f"Dice of {s}" for s in sel["dice"]) + " |",
        "|" + "---|" * (1 + len(sel["dice"])),
    ]
    for t in targets:
        lines.append(
            f"| {t} | " + " | ".join(f"{sel['dice'][s][t]:.3f}" for s in sel["dice"]) + " |"
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    names = QUICK_TARGETS if args.quick else tuple(TARGETS)
    source, targets = build_data(args, out / "data", names)
    if args.checkpoint:
        encoder = Path(args.checkpoint)
    elif args.quick:
        encoder = untrained_encoder(out / "encoder.pt")
    else:
        enc_data = out / "data" / "encoder_reference"
        if not enc_data.exists():
            generate_cohort(enc_data, 16, REFERENCE, 99, tuple(args.shape))
        encoder = train_encoder(enc_data, out / "encoder", args.encoder_patch, args.encoder_epochs)
    print(f"data and encoder ready after {time.perf_counter() - t0:.0f} s", flush=True)
    runs = {}
    for seed in args.seeds:
        ts = time.perf_counter()
        runs[seed] = run_transfer(
            encoder, ("source", source), targets, out / f"seed{seed}", settings_for(args, seed)
        )
        rho = runs[seed]["correlations"].get("aad", {}).get("spearman")
        print(f"seed {seed}: {time.perf_counter() - ts:.0f} s, AAD Spearman {rho}", flush=True)
    result = {
        "command": "python scripts/transferability.py "
        + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "encoder": str(encoder),
        "device": "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu",
        "targets": {n: {"kind": TARGETS[n][0], "changes": TARGETS[n][1]} for n in names},
        "runs": runs,
        "summary": summarise(runs),
        "selection": None,
        "seconds": time.perf_counter() - t0,
    }
    # Written now and again after the (long) selection check, so its cost never risks these.
    write_outputs(out, result)
    if args.selection:
        ts = time.perf_counter()
        result["selection"] = run_selection_check(args, out, encoder, targets)
        result["selection_seconds"] = time.perf_counter() - ts
        print(f"selection: {result['selection_seconds']:.0f} s", flush=True)
        write_outputs(out, result)
    return result


def write_outputs(out: Path, result: dict) -> None:
    """``transferability.json``, ``.csv`` and ``.md`` of the result so far."""
    write_json(out / "transferability.json", result)
    rows = [
        [seed, t["name"], TARGETS[t["name"]][0], repr(t["dice_mean"]), repr(t["dice_drop"]),
         *("" if t["distances"].get(d) is None else repr(t["distances"][d]) for d in DISTANCES)]
        for seed, r in result["runs"].items() for t in r["targets"]
    ]  # fmt: skip
    write_table_csv(out / "transferability.csv",
                    ["seed", "target", "kind", "dice_mean", "dice_drop", *DISTANCES], rows)  # fmt: skip
    selection = result.get("selection")
    if selection:
        sel_rows = [
            [d, t, v["ranking"][0], v["best"], repr(v["regret"]),
             *(repr(x) for x in v.get("regret_ci95") or ("", "")),
             int(v["top1"]), int(v["top1_within_noise"])]
            for d, verdicts in selection["per_target"].items() for t, v in verdicts.items()
        ]  # fmt: skip
        write_table_csv(out / "transferability_selection.csv",
                        ["distance", "target", "chosen", "best", "regret", "regret_ci95_lo",
                         "regret_ci95_hi", "top1", "top1_within_noise"], sel_rows)  # fmt: skip
    text = markdown(result) + (selection_markdown(selection) if selection else "")
    (out / "transferability.md").write_text(text, encoding="utf-8")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="encoder checkpoint (default: train one first)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, untrained encoder: plumbing")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 48, 48])
    p.add_argument("--source-subjects", type=int, default=16)
    p.add_argument("--target-subjects", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20, help="segmenter epochs")
    p.add_argument("--patch", type=int, default=32, help="segmenter patch size")
    p.add_argument("--samples", type=int, default=8, help="segmenter patches per subject and epoch")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--encoder-epochs", type=int, default=6)
    p.add_argument("--encoder-patch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--selection",
        action="store_true",
        help="also check source selection (one segmenter per candidate source)",
    )
    p.add_argument("--selection-subjects", type=int, default=12)
    p.add_argument(
        "--selection-test-fraction",
        type=float,
        default=0.25,
        help="held-out share of each candidate source (at least 2 subjects)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.shape, args.source_subjects, args.target_subjects = [24, 24, 24], 4, 2
        args.selection_subjects = 3
        args.epochs = min(args.epochs, 1)
    return args


def main(argv: list[str] | None = None) -> int:
    result = run(parse(argv))
    best = result["summary"]["best"]
    print(f"wrote {Path(result['args']['out']) / 'transferability.md'}; best predictor: {best}")
    if result["selection"]:
        chance = result["selection"]["chance"]
        print(
            f"selection by a random pick: strict top-1 {chance['top1_rate']:.0%}, within noise "
            f"{chance['top1_within_noise_rate']:.0%}"
        )
        for d, row in result["selection"]["summary"].items():
            print(
                f"selection by {d}: strict top-1 {row['top1_rate']:.0%}, within noise "
                f"{row['top1_within_noise_rate']:.0%} of {row['n_targets']} targets"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
