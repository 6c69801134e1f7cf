"""Sensitivity benchmark: which acquisition and population shifts each feature set's AAD detects.

Synthetic BraTS-style cohorts (``aad_med.data.synthetic``) are written as NIfTI files and go
through the real pipeline (discovery, validation, preprocessing, evaluation patch grid,
encoder). For every shift kind x severity a pool of shifted subjects is written with anatomy
independent of the reference pool (another seed); each repeat draws ``n`` subjects from each
pool, fits the feature set's standardisation on those ``2n`` subjects and runs the AAD
permutation test. Same-site false-positive rates come from random halves of ``2n`` reference
subjects. All feature sets share one encoding pass (their raw blocks are computed together,
and cached per pool next to its NIfTI files, keyed by the checkpoint's SHA-256).

``--scale`` chooses how the vectors are standardised: ``pooled`` (fitted on the 2n compared
subjects, as before the fixed scale), ``checkpoint`` (the fixed per-block reference that
``aad-train`` stores in ``checkpoint["feature_reference"]``, as ``aad-compare`` applies it; rows
are labelled ``FEATURES@checkpoint``) or ``both``, side by side on the same splits. The cached
raw blocks serve both. ``--feature-reference`` names another checkpoint file holding the
reference (the cache is keyed by ``--checkpoint``'s hash, so a copy with the reference added
reuses it); ``--quick`` fits one on a small extra cohort with
:func:`aad_med.embedding.standardize.reference_from_subjects`.

``omnibus:FEATURES`` rows run :func:`aad_med.distances.omnibus.omnibus_permutation_test`: the AAD,
MMD and energy on FEATURES plus the intensity fingerprint, all on the same label shuffles, one
exact combined p-value (min-p); the rows record which component drove each detection.

The default ``--shape`` is the synthetic data config's (``configs/data/synthetic.yaml``); patch
size and model come from the checkpoint, so a checkpoint of the default ``aad-train`` config
measures the defaults users get. Its validation loss is recorded.

    python scripts/sensitivity.py --checkpoint runs/train/checkpoints/best.pt --out bench/ \\
        [--shape 96 104 88] [--subjects 16 32] [--repeats 20] [--null-repeats 200] \\
        [--scale pooled|checkpoint|both] [--feature-reference CKPT_WITH_REFERENCE]
    python scripts/sensitivity.py --quick --out /tmp/sens     # tiny, untrained encoder, seconds

Writes ``sensitivity.json``, ``sensitivity.csv``, ``sensitivity.png`` and ``sensitivity.md``
(a Markdown section for BENCHMARKS.md) into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from aad_med.data.intensity import intensity_fingerprint
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.synthetic import SITES, generate_cohort
from aad_med.data.validation import load_cohort
from aad_med.distances import aad_permutation_test
from aad_med.distances.omnibus import default_components, omnibus_permutation_test
from aad_med.embedding import embed_cohort, file_sha256, get_feature_set, input_texture
from aad_med.embedding import intensity_shape as intensity_blocks
from aad_med.embedding.acquisition import (
    ConcatFeatureSet,
    PositionMatchedFeatures,
    standardize_jointly,
)
from aad_med.embedding.standardize import missing_blocks
from aad_med.examples import quick_model
from aad_med.plots.style import OKABE_ITO, new_figure, save_figure

REFERENCE = SITES["reference"]

# Shift kind -> severities (label, changes to the reference site); the last one is the target.
SHIFTS: dict[str, list[tuple[str, dict]]] = {
    "noise": [("noise 6%", {"noise": 0.06}), ("noise 12%", {"noise": 0.12})],
    "blur": [("blur 0.6", {"blur_sigma": 0.6}), ("blur 1.2", {"blur_sigma": 1.2})],
    "gamma": [("gamma 1.25", {"gamma": 1.25}), ("gamma 1.5", {"gamma": 1.5})],
    "bias": [("bias x3.5", {"bias_field": 0.175}), ("bias x7", {"bias_field": 0.35})],
    "intensity": [("scale x1.25", {"scale": 1.25}), ("scale x1.5", {"scale": 1.5})],
    "population": [
        ("brain 0.94, tumour 1.25", {"brain_size": 0.94, "tumour_size": 1.25}),
        ("brain 0.88, tumour 1.5", {"brain_size": 0.88, "tumour_size": 1.5}),
    ],
}
SINGLE_ACQUISITION = ("noise", "blur", "gamma", "bias")
BASE_PARTS = (
    "latent",
    "multiscale",
    "texture",
    "dispersion",
    "position_matched",
    "intensity_shape",
    "intensity_variation",
    "input_texture",
)
DEFAULT_FEATURES = (
    "latent",
    "multiscale",
    "texture",
    "input_texture",
    "intensity_shape",
    "intensity_variation",
    "multiscale+texture",
    "multiscale+texture+intensity_shape",
    "multiscale+texture+intensity_shape+intensity_variation",
    "texture+intensity_shape",
    "intensity_shape+intensity_variation",
    "input_texture+intensity_shape",
    "input_texture+intensity_shape+intensity_variation",
    "multiscale+input_texture+intensity_shape",
    "omnibus:multiscale+texture",
    "omnibus:multiscale+texture+intensity_shape",
    "omnibus:input_texture+intensity_shape",
)
FINGERPRINT = "intensity_fingerprint"
OMNIBUS = "omnibus:"
FIXED = "@checkpoint"
"""Suffix of a feature set's label when its vectors use the checkpoint's fixed scale."""
SCALES = ("pooled", "checkpoint", "both")
# Blocks measured here before they are registered for users (the report describes every
# registered set with its rates), so they are resolved locally, not through the registry.
NEW_BLOCKS = {**intensity_blocks.FEATURE_SETS, **input_texture.FEATURE_SETS}


def feature_set(name: str):
    """The feature set called ``name`` (``A+B`` combines blocks), new blocks included."""
    parts = name.split("+")

    def part(p: str):
        return NEW_BLOCKS[p]() if p in NEW_BLOCKS else get_feature_set(p)

    return part(name) if len(parts) == 1 else ConcatFeatureSet([part(p) for p in parts], name)


def encode_pool(
    model, prep, folder: Path, extent: int, key: str | None = None
) -> dict[str, np.ndarray]:
    """Raw blocks of every base feature set (and the intensity fingerprint) for one cohort.

    With ``key`` (the checkpoint's hash) the blocks are cached in ``folder/blocks-KEY.npz``.
    """
    cache = folder / f"blocks-{key[:16]}-e{extent}.npz" if key else None
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            if set(f.files) == {*BASE_PARTS, FINGERPRINT}:
                return {k: f[k] for k in f.files}
    cohort = load_cohort(folder)
    bundle = ConcatFeatureSet(
        [PositionMatchedFeatures(extent) if p == "position_matched" else feature_set(p)
         for p in BASE_PARTS]
    )  # fmt: skip
    emb = embed_cohort(model, cohort, prep, features=bundle, progress=False)
    blocks = dict(zip(BASE_PARTS, bundle.split(emb.vectors), strict=True))
    blocks[FINGERPRINT] = intensity_fingerprint(cohort.subjects)
    if cache is not None:
        np.savez(cache, **blocks)
    return blocks


def raw_vectors(name: str, blocks: dict[str, np.ndarray], idx: np.ndarray):
    """``(feature_set_or_None, raw rows idx)`` for a feature set or the fingerprint."""
    if name == FINGERPRINT:
        return None, blocks[FINGERPRINT][idx]
    fs = feature_set(name)
    if isinstance(fs, ConcatFeatureSet):
        return fs, fs.assemble({p.name: blocks[p.name][idx] for p in fs.parts})
    return fs, blocks[name][idx]


def with_scale(name: str, scale: str) -> list[str]:
    """Row labels of feature set ``name`` under ``--scale``: ``NAME`` (pooled) and/or
    ``NAME@checkpoint``; sets without a fixed scale (fingerprint, latent, position_matched)
    keep their one label."""
    base = name[len(OMNIBUS) :] if name.startswith(OMNIBUS) else name
    fixable = base != FINGERPRINT and base != "latent" and "position_matched" not in base
    if not fixable or scale == "pooled":
        return [name]
    return [name + FIXED] if scale == "checkpoint" else [name, name + FIXED]


def finalised(name, blocks_a, idx_a, blocks_b, idx_b, reference=None) -> dict[str, np.ndarray]:
    """One feature set's vectors of both samples: standardisation fitted on the 2n subjects, or
    with ``reference`` (a ``feature_reference``) the fixed per-subject map ``aad-compare`` uses.

    Raises:
        ValueError: ``reference`` lacks a block of ``name``.
    """
    fs, a = raw_vectors(name, blocks_a, idx_a)
    _, b = raw_vectors(name, blocks_b, idx_b)
    if fs is None:
        return standardize_jointly({"a": a, "b": b})
    if reference is not None:
        missing = missing_blocks(fs, reference)
        if missing:
            raise ValueError(f"the feature reference has no block {missing} of {name}")
    return fs.finalize({"a": a, "b": b}, reference=reference)


def test_pair(name, blocks_a, idx_a, blocks_b, idx_b, n_perm: int, seed: int, reference=None):
    """``(p, driver)``: the AAD permutation p-value of a feature set (driver ``None``), or for
    ``omnibus:FEATURES`` the omnibus p-value and the component that drove it. A name ending in
    ``@checkpoint`` uses ``reference`` (the fixed scale) instead of the pooled one."""
    if name.endswith(FIXED):
        if reference is None:
            raise ValueError(f"{name}: no feature reference given")
        name = name[: -len(FIXED)]
    else:
        reference = None
    if name.startswith(OMNIBUS):
        f = finalised(name[len(OMNIBUS) :], blocks_a, idx_a, blocks_b, idx_b, reference)
        fp_a, fp_b = blocks_a[FINGERPRINT][idx_a], blocks_b[FINGERPRINT][idx_b]
        comps = default_components(f["a"], f["b"], fp_a, fp_b)
        res = omnibus_permutation_test(comps, n_perm, seed=seed)
        return float(res.omnibus_p), res.driver
    final = finalised(name, blocks_a, idx_a, blocks_b, idx_b, reference)
    return float(aad_permutation_test(final["a"], final["b"], n_perm, seed=seed).pvalue), None


def pvalue(name, blocks_a, idx_a, blocks_b, idx_b, n_perm: int, seed: int, reference=None):
    """The p-value of :func:`test_pair`."""
    return test_pair(name, blocks_a, idx_a, blocks_b, idx_b, n_perm, seed, reference)[0]


def pool_folder(data: Path, name: str, site, seed: int, n: int, shape) -> Path:
    """The folder of one synthetic pool, ``data/NAME-nN-seedS-XxYxZ``, written on first use (so a
    ``--data`` folder is shared by every benchmark that names its pools this way)."""
    folder = Path(data) / f"{name}-n{n}-seed{seed}-{'x'.join(map(str, shape))}"
    if not (folder / "synthetic.json").exists():
        generate_cohort(folder, n_subjects=n, site=site, seed=seed, shape=shape)
    return folder


def shift_levels(kinds, all_severities: bool = False) -> list[tuple[str, str, dict, int]]:
    """``(kind, label, changes, k)`` of every shifted pool in order; pool ``k`` is named
    ``KIND-k`` and seeded ``seed + 1000 + k`` (:func:`pool_folder`)."""
    out = []
    for kind in kinds:
        for label, changes in SHIFTS[kind] if all_severities else SHIFTS[kind][-1:]:
            out.append((kind, label, changes, len(out) + 1))
    return out


def quick_reference(model, prep, data: Path, seed: int, shape) -> tuple[dict, str]:
    """``(feature_reference, source)`` for ``--quick``: fitted with
    :func:`aad_med.embedding.standardize.reference_from_subjects` on 6 reference-site subjects
    whose anatomy is independent of every pool (they stand in for the encoder's training set)."""
    from aad_med.embedding.standardize import reference_from_subjects

    folder = pool_folder(data, "train", REFERENCE, seed + 500, 6, shape)
    reference = reference_from_subjects(model, load_cohort(folder), prep)
    return reference, f"reference_from_subjects on {folder.name}"


def training_summary(ck: dict) -> dict:
    """What a checkpoint says about its training: epoch, validation loss, model, subjects."""
    return {
        "epoch": int(ck.get("epoch", -1)),
        "val_loss": float(ck["best_loss"]) if "best_loss" in ck else None,
        "model": ck.get("model_config"),
        "train_subjects": len(ck.get("train_subject_ids", [])),
        "val_subjects": len(ck.get("val_subject_ids", [])),
    }


def block_effects(ref: dict[str, np.ndarray], shifted: dict[str, np.ndarray]) -> list[dict]:
    """Per raw block: how many columns a shift moves and how far (Cohen's d, whole pools).

    The AAD on standardised features sums squared mean differences over all columns, so a
    shift carried by a few columns of a wide block is diluted; this says where the signal is.
    """
    out = []
    for name in (*BASE_PARTS, FINGERPRINT):
        if name == "position_matched":
            continue  # a lattice of cells, not columns with a meaning of their own
        a, b = ref[name], shifted[name]
        sd = np.sqrt((a.var(axis=0, ddof=1) + b.var(axis=0, ddof=1)) / 2.0)
        ok = sd > 1e-12 * (1.0 + np.abs(a.mean(axis=0)))
        d = np.where(ok, (b.mean(axis=0) - a.mean(axis=0)) / np.where(ok, sd, 1.0), 0.0)
        out.append(
            {
                "block": name,
                "columns": int(a.shape[1]),
                "columns_abs_d_over_1": int(np.sum(np.abs(d) > 1.0)),
                "max_abs_d": float(np.abs(d).max()) if d.size else 0.0,
                "argmax_column": int(np.argmax(np.abs(d))) if d.size else -1,
                "mean_d2": float(np.mean(d**2)) if d.size else 0.0,
            }
        )
    return out


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    key, training, reference, reference_from = None, None, None, None
    if args.quick:
        model, prep = quick_model(), PreprocessingConfig(patch_size=8, min_brain_fraction=0.25)
        encoder = "untrained tiny encoder (quick mode: plumbing only, figures mean nothing)"
    else:
        from aad_med.training.checkpoint import load_model_from_checkpoint

        model, prep, _ = load_model_from_checkpoint(args.checkpoint, "cpu")
        encoder = str(args.checkpoint)
        key = file_sha256(args.checkpoint)
        ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        training = training_summary(ck)
        if args.scale != "pooled":
            reference_from = str(args.feature_reference or args.checkpoint)
            if args.feature_reference:
                ck = torch.load(args.feature_reference, map_location="cpu", weights_only=True)
            reference = ck.get("feature_reference")
            if not reference:
                sys.exit(f"{reference_from}: no feature_reference in the checkpoint (--scale)")
    torch.set_num_threads(max(1, args.threads))
    shape = tuple(args.shape)
    extent = int(math.ceil(max(shape) / prep.patch_size) * prep.patch_size)
    n_max = max(args.subjects)
    t0 = time.perf_counter()
    if args.quick and args.scale != "pooled":
        reference, reference_from = quick_reference(model, prep, data, args.seed, shape)
    features = [label for f in args.features for label in with_scale(f, args.scale)] + (
        [FINGERPRINT] if args.fingerprint else []
    )

    def pool(name: str, site, seed: int, n: int) -> dict[str, np.ndarray]:
        return encode_pool(model, prep, pool_folder(data, name, site, seed, n, shape), extent, key)

    ref = pool("reference", REFERENCE, args.seed, 2 * n_max)
    rng = np.random.default_rng(args.seed)
    rows, nulls, effects = [], [], {}
    print(f"reference pool encoded ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for n in args.subjects:
        # The same splits for every feature set, so their rates compare like with like.
        splits = [rng.choice(2 * n_max, 2 * n, replace=False) for _ in range(args.null_repeats)]
        for name in features:
            hits = 0
            for r, idx in enumerate(splits):
                p = pvalue(name, ref, idx[:n], ref, idx[n:], args.permutations, r, reference)
                hits += p < args.alpha
            fpr = hits / args.null_repeats
            se = math.sqrt(args.alpha * (1 - args.alpha) / args.null_repeats)
            nulls.append(
                {"n": n, "features": name, "scale": scale_of(name), "fpr": fpr,
                 "repeats": args.null_repeats, "se": se}
            )  # fmt: skip
    print(f"same-site splits done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for kind, label, changes, k in shift_levels(args.shifts, args.all_severities):
        site = REFERENCE.with_updates(name=kind, **changes)
        shifted = pool(f"{kind}-{k}", site, args.seed + 1000 + k, n_max)
        effects[label] = block_effects(ref, shifted)
        for n in args.subjects:
            draws = [
                (rng.choice(2 * n_max, n, replace=False), rng.choice(n_max, n, replace=False))
                for _ in range(args.repeats)
            ]
            for name in features:
                ps, drivers = [], {}
                for r, (ia, ib) in enumerate(draws):
                    p, drv = test_pair(name, ref, ia, shifted, ib, args.permutations, r, reference)
                    ps.append(p)
                    if drv is not None and p < args.alpha:
                        drivers[drv] = drivers.get(drv, 0) + 1
                ps = np.asarray(ps)
                rows.append(
                    {
                        "shift": kind,
                        "severity": label,
                        "target": label == SHIFTS[kind][-1][0],
                        "params": changes,
                        "n": n,
                        "features": name,
                        "scale": scale_of(name),
                        "detection_rate": float(np.mean(ps < args.alpha)),
                        "median_p": float(np.median(ps)),
                        "repeats": args.repeats,
                        **({"drivers": drivers} if name.startswith(OMNIBUS) else {}),
                    }
                )
        print(f"{label}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return {
        "command": "python scripts/sensitivity.py " + " ".join(map(shlex.quote, args.argv)),
        "encoder": encoder,
        "training": training,
        "preprocessing": prep.to_dict(),
        "shape": list(shape),
        "alpha": args.alpha,
        "permutations": args.permutations,
        "pool_sizes": {"reference": 2 * n_max, "shifted": n_max},
        "features": features,
        "scale": args.scale,
        "feature_reference": reference_summary(reference, reference_from),
        "seconds": round(time.perf_counter() - t0, 1),
        "results": rows,
        "same_site": nulls,
        "block_effects": effects,
    }


def scale_of(label: str) -> str:
    """``checkpoint`` for a fixed-scale row, ``raw`` for the fingerprint, else ``pooled``."""
    if label.endswith(FIXED):
        return "checkpoint"
    return "raw" if label == FINGERPRINT else "pooled"


def reference_summary(reference: dict | None, source: str | None) -> dict | None:
    """Where the fixed scale came from and what it was fitted on (not the numbers)."""
    if reference is None:
        return None
    return {
        "source": source,
        "n_subjects": reference.get("n_subjects"),
        "subjects": reference.get("subjects"),
        "blocks": {k: int(v["width"]) for k, v in reference.get("blocks", {}).items()},
    }


def calibrated(result: dict, name: str, n: int) -> bool:
    """False-positive rate within two Monte-Carlo standard errors above alpha."""
    for r in result["same_site"]:
        if r["features"] == name and r["n"] == n:
            return r["fpr"] <= result["alpha"] + 2 * r["se"]
    return False


def summary(result: dict, n: int, min_rate: float = 0.8) -> list[dict]:
    """Per feature set: target-severity shift kinds detected in at least ``min_rate`` of repeats."""
    out = []
    for name in result["features"]:
        rates = {
            r["shift"]: r["detection_rate"]
            for r in result["results"]
            if r["features"] == name and r["n"] == n and r["target"]
        }
        fpr = next(
            (r["fpr"] for r in result["same_site"] if r["features"] == name and r["n"] == n), None
        )
        out.append(
            {
                "features": name,
                "rates": rates,
                "fpr": fpr,
                "calibrated": calibrated(result, name, n),
                "single_detected": sum(rates.get(k, 0) >= min_rate for k in SINGLE_ACQUISITION),
                "all_detected": sum(v >= min_rate for v in rates.values()),
            }
        )
    return out


def best_feature_set(result: dict, n: int) -> str | None:
    """The encoder feature set detecting most shift kinds at a calibrated false-positive rate."""
    cands = [
        s
        for s in summary(result, n)
        if s["calibrated"]
        and s["features"] != FINGERPRINT
        and not s["features"].startswith(OMNIBUS)
    ]
    if not cands:
        return None
    key = lambda s: (s["single_detected"], s["all_detected"], sum(s["rates"].values()))  # noqa: E731
    return max(cands, key=key)["features"]


def write_csv(path: Path, result: dict) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shift", "severity", "n", "features", "rate", "median_p", "repeats", "se"])
        for r in result["same_site"]:
            w.writerow(
                ["same_site", "-", r["n"], r["features"], r["fpr"], "", r["repeats"], r["se"]]
            )
        for r in result["results"]:
            w.writerow(
                [r["shift"], r["severity"], r["n"], r["features"], r["detection_rate"],
                 r["median_p"], r["repeats"], ""]
            )  # fmt: skip


def plot(path: Path, result: dict, n: int) -> Path:
    """Detection rate by severity for each shift kind (one panel each) and same-site FPR."""
    kinds = list(dict.fromkeys(r["shift"] for r in result["results"]))
    feats = result["features"]
    cols = min(4, len(kinds) + 1)
    rows_ = math.ceil((len(kinds) + 1) / cols)
    fig = new_figure(3.2 * cols, 2.6 * rows_)
    colors = {f: OKABE_ITO[i % len(OKABE_ITO)] for i, f in enumerate(feats)}
    markers = {f: "osD^"[(i // len(OKABE_ITO)) % 4] for i, f in enumerate(feats)}
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(rows_, cols, i + 1)
        for name in feats:
            pts = [r for r in result["results"] if r["shift"] == kind and r["features"] == name
                   and r["n"] == n]  # fmt: skip
            ax.plot(range(len(pts)), [r["detection_rate"] for r in pts], "-",
                    marker=markers[name], color=colors[name], label=name, alpha=0.85)  # fmt: skip
            ax.set_xticks(range(len(pts)), [r["severity"] for r in pts], fontsize=7)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(kind, fontsize=9)
        ax.set_ylabel(f"detected (p<{result['alpha']})", fontsize=8)
    ax = fig.add_subplot(rows_, cols, len(kinds) + 1)
    fprs = [
        next((r["fpr"] for r in result["same_site"] if r["features"] == f and r["n"] == n), 0.0)
        for f in feats
    ]
    ax.bar(range(len(feats)), fprs, color=[colors[f] for f in feats])
    ax.axhline(result["alpha"], color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(feats)), feats, fontsize=6, rotation=90)
    ax.set_title("same site (false positives)", fontsize=9)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(feats)), fontsize=7)
    fig.suptitle(f"AAD sensitivity, {n} subjects per cohort", fontsize=10)
    return save_figure(fig, path)


def markdown(result: dict, n: int) -> str:
    kinds = list(dict.fromkeys(r["shift"] for r in result["results"]))
    targets = {r["shift"]: r["severity"] for r in result["results"] if r["target"]}
    lines = [
        "## Sensitivity to acquisition and population shifts",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Encoder: {result['encoder']}; volumes {'x'.join(map(str, result['shape']))}, "
        f"patch {result['preprocessing']['patch_size']}; AAD permutation test with "
        f"{result['permutations']} permutations, alpha = {result['alpha']}. Pools: "
        f"{result['pool_sizes']['reference']} reference subjects, "
        f"{result['pool_sizes']['shifted']} per shifted site (independent anatomy); every "
        "repeat draws n per cohort from the pools and refits the standardisation.",
        "",
    ]
    fr = result.get("feature_reference")
    if fr:
        lines += [
            f"Rows marked `{FIXED}` use the fixed scale instead (`feature_reference`, fitted on "
            f"{fr['n_subjects']} subjects; from {fr['source']}); the others are standardised "
            "over the 2n compared subjects (pooled). Both on the same splits.",
            "",
        ]
    tr = result.get("training")
    if tr:
        mc = tr.get("model") or {}
        lines += [
            f"Model: channels {mc.get('channels')}, strides {mc.get('strides')}, latent_dim "
            f"{mc.get('latent_dim')}, patch {mc.get('patch_size')}, norm {mc.get('norm')}; "
            f"best checkpoint at epoch {tr['epoch']}, validation loss {tr['val_loss']:.4f} "
            f"({tr['train_subjects']} training / {tr['val_subjects']} validation subjects).",
            "",
        ]
    for m in sorted({r["n"] for r in result["same_site"]}):
        lines += [
            f"### {m} subjects per cohort: detection rate at the target severity",
            "",
            "| features | "
            + " | ".join(f"{k} ({targets.get(k, '')})" for k in kinds)
            + " | same-site FPR |",
            "|---" * (len(kinds) + 2) + "|",
        ]
        for s in summary(result, m):
            cells = [f"{s['rates'].get(k, float('nan')):.2f}" for k in kinds]
            fpr = f"{s['fpr']:.3f}" + ("" if s["calibrated"] else " (too high)")
            label = s["features"] + (
                " (raw-image statistic)" if s["features"] == FINGERPRINT else ""
            )
            if s["features"].startswith(OMNIBUS):
                label = (
                    f"**omnibus** (min-p of AAD, MMD, energy on "
                    f"{s['features'][len(OMNIBUS) :]} + fingerprint)"
                )
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {fpr} |")
        nulls = [r for r in result["same_site"] if r["n"] == m]
        if nulls:
            lines += ["", f"Same-site FPR: {nulls[0]['repeats']} random splits, Monte-Carlo "
                      f"standard error {nulls[0]['se']:.3f} at alpha."]  # fmt: skip
        drv = [
            f"{r['shift']}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["drivers"].items()))
            for r in result["results"]
            if r["n"] == m and r["target"] and r.get("drivers")
            and r["features"] == next((f for f in result["features"] if f.startswith(OMNIBUS)), "")
        ]  # fmt: skip
        if drv:
            lines += ["", "Omnibus detections by driving component: " + "; ".join(drv) + "."]
        best = best_feature_set(result, m)
        if best:
            lines += ["", f"Best encoder feature set at a calibrated FPR: **{best}**."]
        lines.append("")
    if any(not r["target"] for r in result["results"]):
        lines += ["Milder severities are in `sensitivity.csv` and the plot.", ""]
    for label, blocks in result.get("block_effects", {}).items():
        lines += [
            f"### Where the signal is: {label} (Cohen's d per raw column, whole pools)",
            "",
            "| block | columns | columns with abs(d) > 1 | largest abs(d) (column) | mean d² |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {b['block']} | {b['columns']} | {b['columns_abs_d_over_1']} | "
            f"{b['max_abs_d']:.2f} ({b['argmax_column']}) | {b['mean_d2']:.2f} |"
            for b in blocks
        ]
        lines.append("")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint written by aad-train (not needed with --quick)")
    p.add_argument("--out", default="outputs/sensitivity")
    p.add_argument("--data", help="folder for the synthetic pools (default OUT/data; reused)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 104, 88])
    p.add_argument("--subjects", type=int, nargs="+", default=[16, 32])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--null-repeats", type=int, default=200)
    p.add_argument("--permutations", type=int, default=999)
    p.add_argument("--alpha", type=float, default=0.01)
    p.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    p.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES))
    p.add_argument("--all-severities", action="store_true", help="also the milder severities")
    p.add_argument("--no-fingerprint", dest="fingerprint", action="store_false")
    p.add_argument(
        "--scale", choices=SCALES, default=None,
        help="standardisation: over the compared subjects (pooled), the checkpoint's fixed "
        "feature_reference, or both side by side (default pooled; both with --quick)",
    )  # fmt: skip
    p.add_argument(
        "--feature-reference",
        help="checkpoint file whose feature_reference is used (default: --checkpoint)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny volumes and untrained encoder")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        # Tiny n cannot reach p < 0.01 with few permutations: quick mode tests at 0.05.
        args.shape, args.subjects, args.repeats, args.null_repeats = [24, 24, 20], [5], 2, 10
        args.permutations, args.shifts, args.alpha = 99, ["noise", "population"], 0.05
        args.scale = args.scale or "both"
    elif not args.checkpoint:
        p.error("--checkpoint is required (or use --quick)")
    args.scale = args.scale or "pooled"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(args)
    out = Path(args.out)
    n = 16 if 16 in args.subjects else args.subjects[0]
    result["best"] = {str(m): best_feature_set(result, m) for m in args.subjects}
    (out / "sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
    write_csv(out / "sensitivity.csv", result)
    plot(out / "sensitivity.png", result, n)
    (out / "sensitivity.md").write_text(markdown(result, n))
    print(markdown(result, n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
