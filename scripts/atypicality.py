"""Atypical-subjects benchmark: per-subject false-positive rate on clean subjects and detection of
planted problem subjects, with :mod:`aad_med.distances.atypicality`.

Synthetic BraTS-style cohorts (``aad_med.data.synthetic``) go through the real pipeline
(discovery, validation, preprocessing, encoder). A pool of clean subjects of one site gives the
references; a separate 20-subject test cohort of the same site (other anatomy) has 3 planted
problem subjects, written over their clean files: T1 and T2 files swapped, heavy Rician noise
(the generator's own noise model) and a strong blur. Three feature spaces are scored: the
default encoder features (``multiscale+texture``), the intensity fingerprint and the MRIQC-style
IQMs (:mod:`aad_med.data.quality`), each standardised jointly over reference and test subjects
(as ``aad-compare`` does). FRD-score's image-level rule (``frd_score.detect_ood`` 1.0.1,
defaults: L2 distance to the reference mean, flagged above ``mean + Φ⁻¹(0.95) sd`` of the
reference subjects' own distances) runs side by side on the same features.

    python scripts/atypicality.py --checkpoint runs/enc/checkpoints/best.pt --out bench/ \\
        [--shape 48 52 44] [--pool 120] [--splits 300]
    python scripts/atypicality.py --quick --out /tmp/atyp     # tiny, untrained encoder, seconds

Writes ``atypicality.json`` and ``atypicality.md`` (a Markdown section for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import stats

from aad_med.data.intensity import intensity_fingerprint
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.quality import cohort_quality
from aad_med.data.synthetic import (
    SITES,
    brats_affine,
    generate_cohort,
    generate_subject,
    subject_id_for,
    subject_seed,
    write_nifti_atomic,
)
from aad_med.data.validation import load_cohort
from aad_med.distances.atypicality import (
    atypicality,
    bh_qvalues,
    block_contributions,
    conformal_pvalues,
    fit_tail,
    tail_pvalues,
    tail_sf,
)
from aad_med.embedding import embed_cohort, get_feature_set
from aad_med.embedding.acquisition import standardize_jointly
from aad_med.examples import quick_model

REFERENCE = SITES["reference"]
ENCODER_FEATURES = "multiscale+texture"
SPACES = ("encoder", "fingerprint", "iqm")
METHODS = ("knn", "mahalanobis")
PLANTS = {"t1_t2_swap": None, "rician_noise": {"noise": 0.3}, "blur": {"blur_sigma": 2.0}}
"""Planted problem -> changes to the reference site (``None``: T1 and T2 files swapped)."""
ALPHAS = (0.05, 0.01, 0.001)
PVALUES = ("rank", "tail_lognormal", "tail_gamma", "fit_gamma")
"""p-values compared: conformal rank; rank refined beyond the largest LOO score by a lognormal
(the default) or gamma tail; a gamma fitted to all LOO scores used alone (no rank part)."""
TEST_START = 100_000
"""``start_index`` of the test cohort: anatomy independent of the pool's."""


def plant(folder: Path, positions: dict[str, int], seed: int, shape) -> None:
    """Overwrite the clean files of the test subjects at ``positions`` with planted problems."""
    affine = brats_affine(shape)
    records = {r.subject_id: r for r in load_cohort(folder).subjects}
    for kind, i in positions.items():
        rec = records[subject_id_for("brats2021", TEST_START + i)]
        paths = {ch: rec.images[ch].path for ch in rec.images}
        if PLANTS[kind] is None:
            t1 = np.asarray(nib.load(paths["t1"]).dataobj, dtype=np.float32)
            t2 = np.asarray(nib.load(paths["t2"]).dataobj, dtype=np.float32)
            write_nifti_atomic(paths["t1"], t2, affine)
            write_nifti_atomic(paths["t2"], t1, affine)
            continue
        site = dataclasses.replace(REFERENCE, name=kind, **PLANTS[kind])
        vols = generate_subject(rec.subject_id, site, subject_seed(seed, TEST_START + i), shape)
        for ch, path in paths.items():
            write_nifti_atomic(path, vols[ch], affine)


def raw_features(model, prep, folder: Path) -> tuple[list[str], dict[str, np.ndarray], dict]:
    """Subject IDs and raw vectors of every feature space, plus each space's column blocks."""
    cohort = load_cohort(folder)
    fs = get_feature_set(ENCODER_FEATURES)
    emb = embed_cohort(model, cohort, prep, features=fs, progress=False)
    parts = fs.split(emb.vectors)
    iqm_keys, iqm, _ = cohort_quality(cohort.subjects)
    keep = np.all(np.isfinite(iqm), axis=0)  # fber is NaN on skull-stripped data
    fp = intensity_fingerprint(cohort.subjects)
    blocks = {
        "encoder": [(p.name, b.shape[1]) for p, b in zip(fs.parts, parts, strict=True)],
        "fingerprint": [(ch, fp.shape[1] // 4) for ch in ("t1", "t1ce", "t2", "flair")],
        "iqm": [(k, 1) for k, ok in zip(iqm_keys, keep, strict=True) if ok],
    }
    raw = {"encoder": emb.vectors, "fingerprint": fp, "iqm": iqm[:, keep]}
    return cohort.subject_ids, raw, blocks


def standardise(space: str, ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Joint standardisation over reference and test subjects (symmetric in them)."""
    vecs = {"ref": ref, "test": test}
    if space == "encoder":
        out = get_feature_set(ENCODER_FEATURES).finalize(vecs)
    else:
        out = standardize_jointly(vecs)
    return out["ref"], out["test"]


def frd_rule(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``frd_score.detect_ood`` defaults (image level, Gaussian, no hold-out): flags and p."""
    mean = ref.mean(axis=0)
    val = np.linalg.norm(ref - mean, axis=1)
    s = np.linalg.norm(test - mean, axis=1)
    mu, sd = val.mean(), val.std()
    flags = s > mu + sd * stats.norm.ppf(0.95)
    return flags, 1 - stats.norm.cdf((s - mu) / max(sd, 1e-10))


def pvalue_kinds(loo: np.ndarray, test_scores: np.ndarray) -> dict[str, np.ndarray]:
    """Every p-value of :data:`PVALUES` for ``test_scores`` given the reference's LOO scores."""
    gamma = fit_tail(loo, "gamma")
    return {
        "rank": conformal_pvalues(test_scores, loo),
        "tail_lognormal": tail_pvalues(test_scores, loo, fit_tail(loo, "lognormal")),
        "tail_gamma": tail_pvalues(test_scores, loo, gamma),
        "fit_gamma": tail_sf(test_scores, gamma),
    }


def fpr_study(raw, n_ref, n_test, splits, alphas, k, rng) -> list[dict]:
    """Per-subject FPR of clean subjects over random reference/test splits of the clean pool."""
    n_pool = next(iter(raw.values())).shape[0]
    hits: dict[tuple, list[float]] = {}
    for _ in range(splits):
        idx = rng.permutation(n_pool)[: n_ref + n_test]
        ri, ti = idx[:n_ref], idx[n_ref:]
        for space in SPACES:
            ref, test = standardise(space, raw[space][ri], raw[space][ti])
            flags, _ = frd_rule(ref, test)
            hits.setdefault((space, "frd", "gaussian", 0.05), []).append(float(flags.mean()))
            for method in METHODS:
                res = atypicality(ref, {"t": test}, method=method, k=k, tail=None)
                pvals = pvalue_kinds(res["reference"]["score"], res["tests"]["t"]["score"])
                for a in alphas:
                    for kind, p in pvals.items():
                        hits.setdefault((space, method, kind, a), []).append(float(np.mean(p <= a)))
    rows = []
    for (space, method, pv, a), rates in hits.items():
        r = np.asarray(rates)
        rows.append({
            "features": space, "method": method, "pvalue": pv, "alpha": a, "n_ref": n_ref,
            "n_test": n_test, "splits": splits, "fpr": float(r.mean()),
            "se": float(r.std(ddof=1) / math.sqrt(r.size)) if r.size > 1 else None,
        })  # fmt: skip
    return rows


def planted_study(raw_pool, raw_test, ids, blocks, planted_idx, n_ref, draws, k, rng) -> list:
    """Ranks and p-values of the planted subjects against ``draws`` random references."""
    n_pool = next(iter(raw_pool.values())).shape[0]
    clean = np.setdiff1d(np.arange(len(ids)), planted_idx)
    out = []
    for space in SPACES:
        per = {(m, pv): [] for m in METHODS for pv in PVALUES} | {("frd", "gaussian"): []}
        examples = {}
        for d in range(draws):
            ri = rng.choice(n_pool, n_ref, replace=False)
            ref, test = standardise(space, raw_pool[space][ri], raw_test[space])
            flags, _ = frd_rule(ref, test)
            per[("frd", "gaussian")].append({
                "planted_flagged": int(flags[planted_idx].sum()),
                "clean_flagged": int(flags[clean].sum()),
            })  # fmt: skip
            for method in METHODS:
                full = atypicality(ref, {"t": test}, method=method, k=k, tail=None)
                res = full["tests"]["t"]
                pvals = pvalue_kinds(full["reference"]["score"], res["score"])
                order = np.argsort(-res["score"], kind="stable")
                rank = np.empty(len(ids), int)
                rank[order] = np.arange(1, len(ids) + 1)
                for pv, p in pvals.items():
                    q = bh_qvalues(p)
                    per[(method, pv)].append({
                        "planted_ranks": sorted(int(r) for r in rank[planted_idx]),
                        "top3": bool(np.all(rank[planted_idx] <= len(planted_idx))),
                        "planted_p05": int(np.sum(p[planted_idx] <= 0.05)),
                        "clean_p05": int(np.sum(p[clean] <= 0.05)),
                        "planted_q10": int(np.sum(q[planted_idx] <= 0.10)),
                        "clean_q10": int(np.sum(q[clean] <= 0.10)),
                        "planted_p": [float(v) for v in p[planted_idx]],
                        # the target: planted in the top 3, >= 2 of them p <= 0.05,
                        # at most 2 clean subjects p <= 0.05
                        "target_met": bool(
                            np.all(rank[planted_idx] <= len(planted_idx))
                            and np.sum(p[planted_idx] <= 0.05) >= 2
                            and np.sum(p[clean] <= 0.05) <= 2
                        ),
                    })  # fmt: skip
                if d == 0:
                    bc = block_contributions(res["contributions"], blocks[space])
                    names = list(bc)
                    mat = np.stack([bc[n] for n in names], axis=1)
                    examples[method] = {ids[i]: names[int(np.argmax(mat[i]))] for i in planted_idx}
        for (method, pv), rows in per.items():
            summary = {"features": space, "method": method, "pvalue": pv, "n_ref": n_ref,
                       "draws": draws}  # fmt: skip
            for key in rows[0]:
                if key in ("planted_ranks", "planted_p"):
                    continue
                summary[key] = float(np.mean([r[key] for r in rows]))
            summary["first_draw"] = rows[0]
            if method in examples:
                summary["top_block_first_draw"] = examples[method]
            out.append(summary)
    return out


def markdown(result: dict) -> str:
    a = result["args"]
    n_clean = a["n_test"] - len(PLANTS)
    lines = [
        "## Atypical subjects (per-subject atypicality, `scripts/atypicality.py`)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Encoder: {result['encoder']}; volumes {'x'.join(map(str, a['shape']))}; features "
        f"`{ENCODER_FEATURES}`, intensity fingerprint (4 x 7 percentiles) and IQMs "
        f"({result['n_iqm_columns']} finite columns of `aad_med.data.quality`), each "
        "standardised jointly over reference and test subjects. Scores: kNN "
        f"(k = {result['k']}, mean squared distance to the k nearest reference subjects) and "
        "Ledoit-Wolf Mahalanobis distance to the reference mean. p-values: `rank` = conformal "
        "rank p-value; `tail_lognormal` / `tail_gamma` = rank p-value refined beyond the "
        "largest LOO score by a lognormal (predictive t) / gamma tail fitted to the LOO scores "
        "(`tail_pvalues`, the module default is lognormal); `fit_gamma` = a gamma fitted to all "
        "LOO scores used alone. FRD rule = `frd_score.detect_ood` defaults "
        f"re-implemented on our features. Wall time {result['seconds']:.0f} s.",
        "",
        f"### Clean subjects: per-subject false-positive rate ({a['splits']} random splits of "
        f"{a['pool']} clean subjects; mean over splits ± standard error)",
        "",
        "| features | score | p-value | n_ref | FPR at α=0.05 | FPR at α=0.01 | FPR at α=0.001 |",
        "|---|---|---|---|---|---|---|",
    ]
    order = (*PVALUES, "gaussian")
    fpr = {}
    for r in result["fpr"]:
        fpr[(r["features"], r["method"], r["pvalue"], r["n_ref"], r["alpha"])] = r
    keys = sorted(
        {k[:4] for k in fpr}, key=lambda k: (k[3], SPACES.index(k[0]), k[1], order.index(k[2]))
    )
    for key in keys:
        cells = []
        for alpha in ALPHAS:
            r = fpr.get((*key, alpha))
            cells.append("–" if r is None else f"{r['fpr']:.4f} ± {r['se']:.4f}")
        label = "FRD rule (flag)" if key[1] == "frd" else key[1]
        lines.append(f"| {key[0]} | {label} | {key[2]} | {key[3]} | {' | '.join(cells)} |")
    lines += [
        "",
        f"### Planted subjects: {a['n_test']}-subject test cohort, 3 planted "
        f"({', '.join(PLANTS)}), {n_clean} clean; averages over {a['draws']} random reference "
        "draws",
        "",
        "| features | score | p-value | n_ref | all 3 planted in top 3 | planted p≤0.05 (of 3) "
        f"| clean p≤0.05 (of {n_clean}) | target met | planted q≤0.1 | clean q≤0.1 "
        "| first draw: planted ranks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["planted"]:
        if r["method"] == "frd":
            lines.append(
                f"| {r['features']} | FRD rule (flag) | gaussian | {r['n_ref']} | – | "
                f"{r['planted_flagged']:.2f} | {r['clean_flagged']:.2f} | – | – | – | – |"
            )
            continue
        fd = r["first_draw"]
        lines.append(
            f"| {r['features']} | {r['method']} | {r['pvalue']} | {r['n_ref']} | "
            f"{r['top3']:.2f} | {r['planted_p05']:.2f} | {r['clean_p05']:.2f} | "
            f"{r['target_met']:.2f} | {r['planted_q10']:.2f} | {r['clean_q10']:.2f} | "
            f"{fd['planted_ranks']} |"
        )
    lines += ["", f"Drivers (first draw, n_ref = {min(a['n_ref'])}, kNN): block with the largest "
              "contribution for each planted subject", ""]  # fmt: skip
    for r in result["planted"]:
        if r["method"] == "knn" and r["pvalue"] == "rank" and r["n_ref"] == min(a["n_ref"]):
            named = {result["planted_ids"][sid]: b for sid, b in r["top_block_first_draw"].items()}
            lines.append(f"- {r['features']}: {named}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    if args.quick:
        model, prep = quick_model(), PreprocessingConfig(patch_size=8, min_brain_fraction=0.25)
        encoder = "untrained tiny encoder (quick mode: plumbing only, figures mean nothing)"
    else:
        from aad_med.training.checkpoint import load_model_from_checkpoint

        model, prep, _ = load_model_from_checkpoint(args.checkpoint, "cpu")
        encoder = str(args.checkpoint)
    torch.set_num_threads(max(1, args.threads))
    shape = tuple(args.shape)
    t0 = time.perf_counter()
    tag = "x".join(map(str, shape))
    pool_dir = data / f"pool-n{args.pool}-seed{args.seed}-{tag}"
    if not (pool_dir / "synthetic.json").exists():
        generate_cohort(pool_dir, n_subjects=args.pool, site=REFERENCE, seed=args.seed, shape=shape)
    test_dir = data / f"test-n{args.n_test}-seed{args.seed}-{tag}-planted"
    positions = dict(zip(PLANTS, args.planted, strict=True))
    if not (test_dir / "synthetic.json").exists():
        generate_cohort(
            test_dir, n_subjects=args.n_test, site=REFERENCE, seed=args.seed, shape=shape,
            start_index=TEST_START,
        )  # fmt: skip
        plant(test_dir, positions, args.seed, shape)
    _, raw_pool, _ = raw_features(model, prep, pool_dir)
    test_ids, raw_test, blocks = raw_features(model, prep, test_dir)
    planted_idx = np.array(sorted(positions.values()))
    planted_ids = {test_ids[i]: kind for kind, i in positions.items()}
    rng = np.random.default_rng(args.seed)
    k = min(args.k, min(args.n_ref) - 1)
    fpr, planted = [], []
    for n_ref in args.n_ref:
        if n_ref + args.n_test <= args.pool:
            fpr += fpr_study(raw_pool, n_ref, args.n_test, args.splits, ALPHAS, k, rng)
        planted += planted_study(
            raw_pool, raw_test, test_ids, blocks, planted_idx, n_ref, args.draws, k, rng
        )
    result = {
        "command": "python scripts/atypicality.py " + shlex.join(args.argv),
        "encoder": encoder,
        "args": {key: v for key, v in vars(args).items() if key != "argv"},
        "k": k,
        "n_iqm_columns": len(blocks["iqm"]),
        "planted_ids": planted_ids,
        "fpr": fpr,
        "planted": planted,
        "seconds": time.perf_counter() - t0,
    }
    (out / "atypicality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "atypicality.md").write_text(markdown(result))
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="trained aad-train checkpoint (not needed with --quick)")
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="folder for the synthetic cohorts (default OUT/data)")
    p.add_argument("--shape", type=int, nargs=3, default=[48, 52, 44])
    p.add_argument("--pool", type=int, default=120, help="clean reference pool size")
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--n-ref", type=int, nargs="+", default=[20, 100])
    p.add_argument("--planted", type=int, nargs=3, default=[2, 9, 15],
                   help="test-cohort positions of the swap, noise and blur subjects")  # fmt: skip
    p.add_argument("--splits", type=int, default=300, help="random splits for the FPR")
    p.add_argument("--draws", type=int, default=50, help="reference draws for planted subjects")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes and an untrained encoder")
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.pool, args.n_test = [24, 24, 20], 16, 8
        args.n_ref, args.planted, args.splits, args.draws = [6, 8], [1, 4, 6], 4, 2
    elif args.checkpoint is None:
        p.error("--checkpoint is required (or use --quick)")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    result = run(args)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
