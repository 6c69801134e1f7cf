"""Peers side by side: aad-med's default verdict, the seed's latent AAD, FRD-score, alibi-detect's
``MMDDrift`` and TorchDrift's kernel MMD on the sensitivity suite's cohorts.

The cohorts are those of ``scripts/sensitivity.py`` (same pool names and seeds, so ``--data``
can point at a folder that benchmark wrote): a reference pool of ``2n`` subjects and one pool of
``n`` per shift (single acquisition shifts and a population shift, at the target severity; with
``--all-severities`` also at the milder severity of :data:`sensitivity.SHIFTS`, where a method
more sensitive than aad-med's default would show), written as NIfTI by
:mod:`aad_med.data.synthetic`. Every method reads the same files.

Methods (a peer whose package does not import is skipped, with the reason, in every output):

* ``aad-med default``: what ``aad-compare`` reports first, the omnibus p-value (min-p of the AAD,
  MMD and energy on :data:`aad_med.DEFAULT_FEATURES` under the checkpoint's fixed scale, plus the
  raw intensity fingerprint; ``--permutations``, 10000 as ``stats=default``).
* ``latent AAD (seed)``: the AAD permutation test on the mean patch latents (``features=latent``).
* ``FRD-score``: FRDv1 with the package's 3D defaults (PyRadiomics Original + LoG + Wavelet
  features, the full-image mask its command line uses without masks, D1 = the first cohort)
  on each of ``--frd-channels``, one modality at a time as the package reads one image per
  file; the squared distances of the modalities are added before the log.
* ``alibi MMDDrift`` and ``TorchDrift kernel MMD``, each at its package defaults (alibi: PyTorch
  backend, Gaussian RBF with the median heuristic, 100 permutations; TorchDrift: Gaussian kernel,
  median heuristic, 1000 permutations), on two inputs: ``features`` (the default feature vectors
  aad-med's AAD sees, fixed scale) and ``images`` (each subject's z-scored 4-channel volume from
  aad-med's preprocessing, uncropped, average-pooled by ``--image-pool`` voxels and flattened).

Calibration: the same random same-site splits of the reference pool are scored by every method.
The first half of them sets each method's threshold (at most ``floor(fpr * N)`` of those pairs
score above it; p-value methods score ``-p``, FRD its value); the detection rate of a shift is the
share of its pairs scoring above the threshold, and the reported false-positive rate is measured
on the other half (held out). For methods with a p-value the rate at the nominal ``p < alpha`` is
recorded too. Wall time per subject = the method's extraction seconds per subject (decode and
everything after it, measured over all pools in this run) + one pair's test seconds / 2n.

    python scripts/peers.py --checkpoint CKPT --out bench/peers [--data DIR] [--subjects 16] \\
        [--repeats 20] [--null-repeats 400] [--frd-channels t1 flair] [--methods ...]
    python scripts/peers.py --quick --out /tmp/peers     # tiny, untrained encoder, seconds

Writes ``peers.json``, ``peers.csv`` and ``peers.md`` (a section for BENCHMARKS.md) into --out.

One file, like the other benchmark scripts: the peer adapters, the calibration and the writers
serve this benchmark only, and users run it as one script. It imports aad_med and
``scripts/sensitivity.py`` (the pools); aad_med never imports it or any peer.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from aad_med import CHANNELS, DEFAULT_FEATURES
from aad_med.data.intensity import intensity_fingerprint
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.validation import load_cohort
from aad_med.embedding import embed_cohort, file_sha256, get_feature_set
from aad_med.embedding.preprocessed import PreprocessedSubjects
from aad_med.examples import quick_model

_HERE = Path(__file__).resolve().parent
# Run as a script, scripts/ is first on sys.path, and its coverage.py would shadow the coverage
# package that numba (alibi-detect) and torch look for; the sibling script is loaded by path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]


def _sibling(name: str):
    """Another benchmark script of scripts/ as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"aad_med_scripts_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


sens = _sibling("sensitivity")

SHIFTS = ("gamma", "bias", "noise", "blur", "population", "intensity")
"""Default shift order: that of the sensitivity run at the defaults, so its pools are reused."""
OMNIBUS_ROW = f"{sens.OMNIBUS}{DEFAULT_FEATURES}{sens.FIXED}"
MIN_RATE = 0.8
"""A shift counts as detected by a method when its rate reaches this (the sensitivity bar)."""


@dataclasses.dataclass
class Method:
    """One compared method: the input it reads, its test and why it is skipped (if it is)."""

    key: str
    label: str
    inputs: str  # "aad", "latent", "radiomics" or "images"
    test: Callable | None = None  # (a, b, seed) -> (score, p or None): higher score = shift
    needs: str | None = None  # peer package checked before use
    skipped: str | None = None


# ---------------------------------------------------------------------------------------------
# Peers: import checks and tests


INSTALL = "pip install 'aad-med[peers]' (README, 'Peers side by side')"


def peer_missing(package: str) -> str | None:
    """Why peer ``package`` cannot run here, or ``None`` when it imports."""
    try:
        if package == "frd-score":
            import frd_score.frd as frd

            frd._ensure_radiomics()  # pyradiomics is imported lazily by frd-score
        elif package == "alibi-detect":
            from alibi_detect.cd import MMDDrift  # noqa: F401
        elif package == "torchdrift":
            from torchdrift.detectors import KernelMMDDriftDetector  # noqa: F401
    except Exception as e:  # an ImportError, or a dependency that fails while importing
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{package} not importable ({first}); {INSTALL}"
    return None


def frechet_squared(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Fréchet distance between Gaussians fitted to rows ``a`` and ``b``.

    Equal to frd-score's ``calculate_frechet_distance(mu1, cov1, mu2, cov2)`` (``np.cov``,
    ddof 1) without its d x d matrix square root: with ``C1 = A'A`` and ``C2 = B'B`` (centred rows
    over sqrt(n - 1)), ``tr sqrt(C1 C2)`` is the nuclear norm of the n1 x n2 matrix ``A B'``.
    """
    ca = (a - a.mean(0)) / math.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / math.sqrt(len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * cross)


def frd_normalised(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """frd-score's FRDv1 steps after extraction: float32, rows with NaN dropped, z-score with the
    first set's statistics (its own function), columns with NaN/Inf in either set dropped."""
    import frd_score.frd as frd

    a, b = (x[~np.isnan(x).any(1)].astype(np.float32) for x in (a, b))
    za, zb = (
        frd.z_score_normalize(x, 0, 1, replace_nan=False, handle_std_zero=False,
                              base_distribution=a)
        for x in (a, b)
    )  # fmt: skip
    keep = np.isfinite(za).all(0) & np.isfinite(zb).all(0)
    return za[:, keep].astype(np.float64), zb[:, keep].astype(np.float64)


def frd_test(a: np.ndarray, b: np.ndarray, seed: int, channels: int = 1) -> tuple[float, None]:
    """FRDv1 of ``channels`` modalities (equal column blocks of ``a`` and ``b``), each as
    frd-score computes it for one folder of images per modality; the squared distances are
    added and logged (the package's ``log(d_F^2)`` for one modality); no p-value."""
    d2 = sum(
        frechet_squared(*frd_normalised(ca, cb))
        for ca, cb in zip(np.split(a, channels, axis=1), np.split(b, channels, axis=1),
                          strict=True)
    )  # fmt: skip
    return (math.log(d2) if d2 > 0 else -math.inf), None


def alibi_test(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float]:
    """alibi-detect ``MMDDrift`` at its defaults (PyTorch backend); score ``-p``."""
    from alibi_detect.cd import MMDDrift

    torch.manual_seed(seed)
    cd = MMDDrift(a.astype(np.float32), backend="pytorch", p_val=0.05, device="cpu")
    p = float(cd.predict(b.astype(np.float32), return_p_val=True)["data"]["p_val"])
    return -p, p


def torchdrift_test(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[float, float]:
    """TorchDrift ``KernelMMDDriftDetector`` at its defaults, p-value mode; score ``-p``."""
    from torchdrift.detectors import KernelMMDDriftDetector

    torch.manual_seed(seed)
    det = KernelMMDDriftDetector(return_p_value=True)
    det.fit(torch.as_tensor(a, dtype=torch.float32))
    p = float(det(torch.as_tensor(b, dtype=torch.float32)))
    return -p, p


# ---------------------------------------------------------------------------------------------
# Extraction: one array (or block dict) per pool and input kind, timed


def radiomics_rows(cohort, channels: list[str], threads: int) -> np.ndarray:
    """FRDv1 3D features of every subject (frd-score's extractor and per-image function, the
    full-image mask it uses without mask files), channels concatenated."""
    import frd_score.frd as frd
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    frd._ensure_radiomics()
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    frd.setVerbosity(60)
    extractor = frd.get_feature_extractor(frd_version="v1", image_dim=3)
    rows = []
    for record in cohort.subjects:
        row = []
        for ch in channels:
            src = record.images[ch]
            if src.volume is not None:
                raise SystemExit(f"{src.path}: FRD-score reads one 3D image per file")
            out = frd.process_image_mask_pair((str(src.path), None), feature_extractor=extractor)
            row.extend(out[0])
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def image_rows(cohort, prep: PreprocessingConfig, pool: int) -> np.ndarray:
    """Each subject's preprocessed volume (aad-med's z-score in the brain, not cropped, so every
    subject keeps the image grid), average-pooled by ``pool`` voxels and flattened."""
    data = PreprocessedSubjects(cohort.subjects, dataclasses.replace(prep, crop_foreground=False))
    rows = []
    for i in range(len(data)):
        image = torch.as_tensor(data[i]["image"])[None]
        rows.append(torch.nn.functional.avg_pool3d(image, pool, ceil_mode=True).flatten())
    return torch.stack(rows).numpy().astype(np.float64)


def extract(kind: str, cohort, ctx: dict, cache: Path | None) -> tuple[object, float]:
    """``(features, seconds)`` of one input kind for one pool. Radiomics are cached in ``cache``
    per pool and channel with the seconds they took (extraction takes seconds per image)."""
    t0 = time.perf_counter()
    if kind == "aad":
        fs = get_feature_set(DEFAULT_FEATURES)
        emb = embed_cohort(ctx["model"], cohort, ctx["prep"], features=fs, progress=False)
        blocks = dict(zip([p.name for p in fs.parts], fs.split(emb.vectors), strict=True))
        fp = emb.fingerprints
        blocks[sens.FINGERPRINT] = fp if fp is not None else intensity_fingerprint(cohort.subjects)
        return blocks, time.perf_counter() - t0
    if kind == "latent":
        emb = embed_cohort(ctx["model"], cohort, ctx["prep"], features="latent", progress=False)
        return {"latent": emb.vectors}, time.perf_counter() - t0
    if kind == "images":
        return image_rows(cohort, ctx["prep"], ctx["image_pool"]), time.perf_counter() - t0
    parts, seconds = [], 0.0
    for ch in ctx["frd_channels"]:
        path = cache / f"radiomics-{Path(cohort.path).name}-{ch}.npz" if cache else None
        if path is not None and path.exists():
            with np.load(path, allow_pickle=False) as f:
                parts.append(f["rows"])
                seconds += float(f["seconds"])
            continue
        t = time.perf_counter()
        rows = radiomics_rows(cohort, [ch], ctx["threads"])
        took = time.perf_counter() - t
        if path is not None:
            np.savez(path, rows=rows, seconds=took)
        parts.append(rows)
        seconds += took
    return np.concatenate(parts, axis=1), seconds


# ---------------------------------------------------------------------------------------------
# Methods


def methods(selected: list[str], ctx: dict) -> list[Method]:
    """The selected methods, in table order, with their tests bound to this run's settings."""
    n_perm, reference = ctx["permutations"], ctx["reference"]

    def aad_default(a, b, seed):
        p, _ = sens.test_pair(OMNIBUS_ROW, a, slice(None), b, slice(None), n_perm, seed, reference)
        return -p, p

    def latent(a, b, seed):
        p = sens.pvalue("latent", a, slice(None), b, slice(None), n_perm, seed)
        return -p, p

    def on_features(test):
        def run(a, b, seed):
            f = sens.finalised(DEFAULT_FEATURES, a, slice(None), b, slice(None), reference)
            return test(f["a"], f["b"], seed)

        return run

    table = {
        "aad_default": Method("aad_default", "aad-med default (omnibus verdict)", "aad",
                              aad_default),
        "aad_latent": Method("aad_latent", "latent AAD (seed)", "latent", latent),
        "frd": Method("frd", f"FRD-score v1 ({'+'.join(ctx['frd_channels'])})", "radiomics",
                      partial(frd_test, channels=len(ctx["frd_channels"])), "frd-score"),
        "alibi_features": Method("alibi_features", "alibi MMDDrift on features", "aad",
                                 on_features(alibi_test), "alibi-detect"),
        "alibi_images": Method("alibi_images", "alibi MMDDrift on images", "images",
                               alibi_test, "alibi-detect"),
        "torchdrift_features": Method("torchdrift_features", "TorchDrift kernel MMD on features",
                                      "aad", on_features(torchdrift_test), "torchdrift"),
        "torchdrift_images": Method("torchdrift_images", "TorchDrift kernel MMD on images",
                                    "images", torchdrift_test, "torchdrift"),
    }  # fmt: skip
    out = []
    for key in selected:
        m = table[key]
        if m.needs:
            m.skipped = peer_missing(m.needs)
        out.append(m)
    return out


METHOD_KEYS = (
    "aad_default",
    "aad_latent",
    "frd",
    "alibi_features",
    "alibi_images",
    "torchdrift_features",
    "torchdrift_images",
)


def rows_of(features, idx):
    """Rows ``idx`` of an array or of every block of a block dict."""
    if isinstance(features, dict):
        return {k: v[idx] for k, v in features.items()}
    return features[idx]


def finite(x: float) -> float | None:
    """``x`` as a JSON number (``None`` for an infinite FRD or threshold)."""
    return float(x) if math.isfinite(x) else None


def threshold(null_scores, fpr: float) -> float:
    """The score above which at most ``floor(fpr * N)`` of the calibration scores lie."""
    s = np.sort(np.asarray(null_scores, dtype=np.float64))[::-1]
    m = int(math.floor(fpr * len(s) + 1e-9))
    return float(s[m]) if m < len(s) else -math.inf


# ---------------------------------------------------------------------------------------------
# The run


def setup(args: argparse.Namespace, data: Path) -> dict:
    """Model, preprocessing, fixed-scale reference and provenance of this run."""
    if args.quick:
        model, prep = quick_model(), PreprocessingConfig(patch_size=8, min_brain_fraction=0.25)
        reference, source = sens.quick_reference(model, prep, data, args.seed, args.shape)
        return {"model": model, "prep": prep, "reference": reference, "reference_from": source,
                "encoder": "untrained tiny encoder (quick mode: plumbing only, figures mean "
                "nothing)", "training": None}  # fmt: skip
    from aad_med.training.checkpoint import load_model_from_checkpoint

    model, prep, _ = load_model_from_checkpoint(args.checkpoint, "cpu")
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    reference = ck.get("feature_reference")
    if not reference:
        sys.exit(
            f"{args.checkpoint}: no feature_reference in the checkpoint (aad-compare's default "
            "fixed scale); use a checkpoint written by the current aad-train"
        )
    return {"model": model, "prep": prep, "reference": reference,
            "reference_from": str(args.checkpoint), "encoder": str(args.checkpoint),
            "sha256": file_sha256(args.checkpoint), "training": sens.training_summary(ck)}  # fmt: skip


def extract_pools(pools: dict[str, Path], kinds: list[str], ctx: dict, cache: Path) -> tuple:
    """Every input kind of every pool, extracted once (the methods sharing an input share it).

    Returns:
        ``({kind: {pool: features}}, {kind: extraction seconds per subject})``.
    """
    feats: dict[str, dict[str, object]] = {k: {} for k in kinds}
    seconds, n_subjects, t0 = dict.fromkeys(kinds, 0.0), 0, time.perf_counter()
    for name, folder in pools.items():
        cohort = load_cohort(folder)
        n_subjects += len(cohort.subjects)
        for kind in kinds:
            feats[kind][name], sec = extract(kind, cohort, ctx, cache)
            seconds[kind] += sec
        print(f"{name}: extracted ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return feats, {k: sec / max(1, n_subjects) for k, sec in seconds.items()}


def shift_cases(kinds: list[str], all_severities: bool) -> list[tuple[str, str, str, dict, int]]:
    """``(case, kind, label, changes, k)`` of every shifted pool, in order. The target severity
    of each kind keeps the pool ``KIND-k`` (``k`` its position) and the case name ``KIND`` of a
    target-only run, so its pools, caches and rows are those of that run; the milder severities
    (``all_severities``) follow as pools ``k = len(kinds) + 1, ...`` and cases ``KIND@LABEL``."""
    cases = [(kind, kind, *sens.SHIFTS[kind][-1], k) for k, kind in enumerate(kinds, 1)]
    if all_severities:
        milder = [
            (kind, label, changes) for kind in kinds for label, changes in sens.SHIFTS[kind][:-1]
        ]
        for j, (kind, label, changes) in enumerate(milder, len(kinds) + 1):
            cases.append((f"{kind}@{label}", kind, label, changes, j))
    return cases


def evaluate(m: Method, f: dict, nulls: list, draws: dict, shifts: list, args) -> tuple:
    """Score one method on every same-site split and shifted pair.

    Returns:
        ``(same_site_row, result_rows, scores, seconds_per_pair)``: the threshold comes from the
        first half of ``nulls``; the FPR is measured on the second half.
    """
    n, ref = args.subjects, f["reference"]
    t_test = time.perf_counter()
    null = [m.test(rows_of(ref, idx[:n]), rows_of(ref, idx[n:]), r) for r, idx in enumerate(nulls)]
    per_pair = (time.perf_counter() - t_test) / max(1, len(nulls))
    n_cal = len(nulls) // 2
    cal, held = null[:n_cal], null[n_cal:]
    t = threshold([s for s, _ in cal], args.fpr)
    has_p = null[0][1] is not None
    null_row = {
        "method": m.key,
        "label": m.label,
        "threshold": finite(t),
        "calibration_pairs": len(cal),
        "heldout_pairs": len(held),
        "fpr_calibration": float(np.mean([s > t for s, _ in cal])),
        "fpr_heldout": float(np.mean([s > t for s, _ in held])),
        "fpr_nominal": float(np.mean([p < args.alpha for _, p in null])) if has_p else None,
    }
    scores, rows = {"same_site": [finite(s) for s, _ in null]}, []
    for case, kind, label, _, _ in shifts:
        res = [m.test(rows_of(ref, ia), rows_of(f[case], ib), r)
               for r, (ia, ib) in enumerate(draws[case])]  # fmt: skip
        sc = np.asarray([s for s, _ in res])
        scores[case] = [finite(s) for s in sc]
        rows.append(
            {
                "method": m.key,
                "shift": case,
                "kind": kind,
                "severity": label,
                "detection_rate": float(np.mean(sc > t)),
                "nominal_rate": float(np.mean([p < args.alpha for _, p in res])) if has_p else None,
                "median_score": finite(float(np.median(sc))),
                "repeats": len(res),
            }
        )
    return null_row, rows, scores, per_pair


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else out / "data"
    cache = out / "cache"
    cache.mkdir(exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    t0 = time.perf_counter()
    ctx = setup(args, data)
    ctx.update(permutations=args.permutations, frd_channels=args.frd_channels,
               image_pool=args.image_pool, threads=args.threads)  # fmt: skip
    ms = methods(args.methods, ctx)
    active = [m for m in ms if m.skipped is None]
    for m in ms:
        if m.skipped:
            print(f"{m.label}: skipped: {m.skipped}", file=sys.stderr)
    n, shape = args.subjects, tuple(args.shape)
    shifts = shift_cases(args.shifts, args.all_severities)
    pools = {"reference": sens.pool_folder(data, "reference", sens.REFERENCE, args.seed, 2 * n,
                                           shape)}  # fmt: skip
    for case, kind, _, changes, k in shifts:
        site = sens.REFERENCE.with_updates(name=kind, **changes)
        pools[case] = sens.pool_folder(data, f"{kind}-{k}", site, args.seed + 1000 + k, n, shape)
    print(f"pools ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    kinds = list(dict.fromkeys(m.inputs for m in active))
    feats, per_subject = extract_pools(pools, kinds, ctx, cache)

    rng = np.random.default_rng(args.seed)
    nulls = [rng.choice(2 * n, 2 * n, replace=False) for _ in range(args.null_repeats)]
    draws = {case: [(rng.choice(2 * n, n, replace=False), rng.choice(n, n, replace=False))
                    for _ in range(args.repeats)] for case, *_ in shifts}  # fmt: skip
    results, same_site, timing, all_scores, frd_check = [], [], [], {}, None
    paired = side_by_side(pools["reference"], kinds, ctx, args.timing_subjects)
    print(f"side-by-side timing done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for m in active:
        null_row, rows, all_scores[m.key], per_pair = evaluate(m, feats[m.inputs], nulls, draws,
                                                               shifts, args)  # fmt: skip
        same_site.append(null_row)
        results += rows
        ref = feats[m.inputs]["reference"]
        extract_s = per_subject[m.inputs]
        pair_s = per_pair
        if m.key == "frd" and not args.quick:
            # What a frd-score user pays per comparison (a d x d square root per modality); the
            # quick mode keeps to the identity, which the tests check against the package.
            pair_s, frd_check = frd_reference_pair_seconds(ref, nulls[0], n,
                                                           len(args.frd_channels))  # fmt: skip
        timing.append(
            {
                "method": m.key,
                "inputs": m.inputs,
                "extract_s_per_subject": extract_s,
                "test_s_per_pair": pair_s,
                "s_per_subject": extract_s + pair_s / (2 * n),
            }
        )
        print(f"{m.label}: tested ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return {
        "command": "python scripts/peers.py " + " ".join(map(shlex.quote, args.argv)),
        "encoder": ctx["encoder"],
        "checkpoint_sha256": ctx.get("sha256"),
        "training": ctx["training"],
        "feature_reference": sens.reference_summary(ctx["reference"], ctx["reference_from"]),
        "preprocessing": ctx["prep"].to_dict(),
        "shape": list(shape),
        "subjects": n,
        "pool_sizes": {"reference": 2 * n, "shifted": n},
        "fpr_target": args.fpr,
        "alpha": args.alpha,
        "permutations": args.permutations,
        "frd_channels": args.frd_channels,
        "frd_pair_timing": "nuclear-norm identity (quick)"
        if args.quick
        else "frd-score calculate_frechet_distance",
        "frd_shortcut_rel_diff": frd_check,
        "side_by_side": {"subjects": args.timing_subjects, "s_per_subject": paired},
        "image_pool": args.image_pool,
        "threads": args.threads,
        "repeats": args.repeats,
        "null_repeats": args.null_repeats,
        "methods": [
            {
                "method": m.key,
                "label": m.label,
                "inputs": m.inputs,
                "status": "skipped" if m.skipped else "ran",
                "reason": m.skipped,
            }
            for m in ms
        ],  # fmt: skip
        "results": results,
        "same_site": same_site,
        "timing": timing,
        "scores": all_scores,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def frd_reference_pair_seconds(
    ref: np.ndarray, idx: np.ndarray, n: int, channels: int
) -> tuple[float, float]:
    """One same-site pair's FRD as frd-score computes it (its own ``calculate_frechet_distance``,
    a d x d matrix square root per modality), timed.

    Returns:
        ``(seconds, largest relative difference to frechet_squared)`` over the modalities (the
        package's square root of a near-singular product is itself accurate to ~1e-6).
    """
    import frd_score.frd as frd

    seconds, worst = 0.0, 0.0
    for a, b in zip(np.split(ref[idx[:n]], channels, axis=1),
                    np.split(ref[idx[n:]], channels, axis=1), strict=True):  # fmt: skip
        t = time.perf_counter()
        za, zb = frd_normalised(a, b)
        d2 = frd.calculate_frechet_distance(za.mean(0), np.cov(za, rowvar=False), zb.mean(0),
                                            np.cov(zb, rowvar=False))  # fmt: skip
        seconds += time.perf_counter() - t
        worst = max(worst, abs(frechet_squared(za, zb) - d2) / max(1.0, abs(d2)))
    return seconds, worst


def side_by_side(folder: Path, kinds: list[str], ctx: dict, k: int) -> dict[str, float]:
    """Extraction seconds per subject of every input kind on the first ``k`` subjects of
    ``folder``, one kind after the other with no cache, so the ratios share the machine's load
    (the radiomics of the main pass may come from the cache of an earlier run)."""
    cohort = load_cohort(folder)
    sub = dataclasses.replace(cohort, subjects=cohort.subjects[:k])
    out = {}
    for kind in kinds:
        _, sec = extract(kind, sub, ctx, None)
        out[kind] = sec / len(sub.subjects)
    return out


# ---------------------------------------------------------------------------------------------
# Outputs


def verdicts(result: dict) -> dict:
    """Shifts a peer detects (rate >= MIN_RATE) that aad-med's default misses, and speed ratios."""
    rate = {(r["method"], r["shift"]): r["detection_rate"] for r in result["results"]}
    shifts = list(dict.fromkeys(r["shift"] for r in result["results"]))
    ran = [m["method"] for m in result["methods"] if m["status"] == "ran"]
    peers = [m for m in ran if m not in ("aad_default", "aad_latent")]
    missed, above = {}, {}
    for s in shifts:
        seen_by = [m for m in peers if rate.get((m, s), 0.0) >= MIN_RATE]
        if seen_by and rate.get(("aad_default", s), 0.0) < MIN_RATE:
            missed[s] = seen_by
        # Any peer detecting more often than the default, however little (milder severities).
        higher = {m: rate[(m, s)] for m in peers if rate.get((m, s), 0.0) > rate.get(
            ("aad_default", s), 1.0)}  # fmt: skip
        if higher:
            above[s] = {"default": rate[("aad_default", s)], "peers": higher}
    per_subject = {t["method"]: t["s_per_subject"] for t in result["timing"]}
    speed = paired = None
    if "aad_default" in per_subject and "frd" in per_subject:
        speed = per_subject["frd"] / per_subject["aad_default"]
        sbs = result.get("side_by_side", {}).get("s_per_subject", {})
        if sbs.get("aad") and sbs.get("radiomics"):
            paired = sbs["radiomics"] / sbs["aad"]
    return {"peers_ran": peers, "missed_by_default": missed, "above_default": above,
            "frd_over_default_time": speed,
            "frd_over_default_extraction_side_by_side": paired,
            "aad_default_ran": "aad_default" in ran}  # fmt: skip


def write_csv(path: Path, result: dict) -> None:
    timing = {t["method"]: t for t in result["timing"]}
    null = {r["method"]: r for r in result["same_site"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "status", "shift", "detection_rate", "nominal_rate", "fpr_heldout",
                    "threshold", "s_per_subject", "reason"])  # fmt: skip
        for m in result["methods"]:
            if m["status"] == "skipped":
                w.writerow([m["method"], "skipped", "", "", "", "", "", "", m["reason"]])
                continue
            s, t = null[m["method"]], timing[m["method"]]
            w.writerow([m["method"], "ran", "same_site", "", s["fpr_nominal"], s["fpr_heldout"],
                        s["threshold"], t["s_per_subject"], ""])  # fmt: skip
            for r in result["results"]:
                if r["method"] == m["method"]:
                    w.writerow([m["method"], "ran", r["shift"], r["detection_rate"],
                                r["nominal_rate"], "", s["threshold"], t["s_per_subject"], ""])  # fmt: skip


def markdown(result: dict) -> str:
    shifts = list(dict.fromkeys(r["shift"] for r in result["results"]))
    sev = {r["shift"]: r["severity"] for r in result["results"]}
    kind = {r["shift"]: r.get("kind", r["shift"]) for r in result["results"]}
    rate = {(r["method"], r["shift"]): r for r in result["results"]}
    null = {r["method"]: r for r in result["same_site"]}
    timing = {t["method"]: t for t in result["timing"]}
    v = verdicts(result)
    fpr = result["fpr_target"]
    lines = [
        "## Peers",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Encoder: {result['encoder']}; volumes {'x'.join(map(str, result['shape']))}; "
        f"{result['subjects']} vs {result['subjects']} subjects per pair; pools of "
        f"{result['pool_sizes']['reference']} reference subjects and "
        f"{result['pool_sizes']['shifted']} per shift. Thresholds calibrated on "
        f"{result['null_repeats'] // 2} same-site splits at a target false-positive rate of "
        f"{fpr:g}; FPR measured on {result['null_repeats'] - result['null_repeats'] // 2} other "
        f"splits; {result['repeats']} pairs per shift; {result['threads']} thread(s).",
        "",
        f"### Detection rate at a calibrated FPR of {fpr:g}",
        "",
        "| method | " + " | ".join(f"{kind[s]} ({sev[s]})" for s in shifts)
        + " | FPR (held out) | s per subject |",
        "|---" * (len(shifts) + 3) + "|",
    ]  # fmt: skip
    for m in result["methods"]:
        if m["status"] == "skipped":
            continue
        k = m["method"]
        cells = [f"{rate[(k, s)]['detection_rate']:.2f}" for s in shifts]
        held = null[k]["fpr_heldout"]
        # Flag a held-out FPR more than two binomial SEs above the target.
        high = held > fpr + 2 * math.sqrt(fpr * (1 - fpr) / null[k]["heldout_pairs"])
        lines.append(
            f"| {m['label']} | " + " | ".join(cells)
            + f" | {held:.3f}{' (above target)' if high else ''} | "
            f"{timing[k]['s_per_subject']:.3g} |"
        )  # fmt: skip
    skipped = [m for m in result["methods"] if m["status"] == "skipped"]
    if skipped:
        lines += [""] + [f"* {m['label']}: **skipped**: {m['reason']}" for m in skipped]
    nominal = [m for m in result["methods"]
               if m["status"] == "ran" and null[m["method"]]["fpr_nominal"] is not None]  # fmt: skip
    if nominal:
        lines += [
            "",
            f"### At the nominal p < {result['alpha']:g} (methods with a p-value)",
            "",
            "| method | "
            + " | ".join(f"{kind[s]} ({sev[s]})" for s in shifts)
            + " | same-site rate (all splits) |",
            "|---" * (len(shifts) + 2) + "|",
        ]
        for m in nominal:
            k = m["method"]
            cells = [f"{rate[(k, s)]['nominal_rate']:.2f}" for s in shifts]
            lines.append(f"| {m['label']} | " + " | ".join(cells)
                         + f" | {null[k]['fpr_nominal']:.3f} |")  # fmt: skip
    lines += ["", "### Reading it", ""]
    if not v["peers_ran"]:
        lines.append("* No peer ran here (see the skipped methods above).")
    elif not v["aad_default_ran"]:
        lines.append("* aad-med's default did not run, so nothing is compared.")
    elif v["missed_by_default"]:
        for s, by in v["missed_by_default"].items():
            lines.append(f"* **{s}**: detected (rate >= {MIN_RATE}) by {', '.join(by)}, "
                         f"missed by aad-med's default.")  # fmt: skip
    else:
        lines.append(f"* aad-med's default detects (rate >= {MIN_RATE}) every shift any peer "
                     f"that ran detects, at the same calibrated FPR.")  # fmt: skip
    for s, row in v.get("above_default", {}).items():
        lines.append(f"* {s}: detected more often than by aad-med's default "
                     f"({row['default']:.2f}) by "
                     + ", ".join(f"{m} ({r:.2f})" for m, r in row["peers"].items()) + ".")  # fmt: skip
    if v["frd_over_default_time"] is not None:
        ratio = v["frd_over_default_time"]
        word = "faster" if ratio > 1 else "slower"
        lines.append(f"* Per subject, aad-med's default is {ratio if ratio > 1 else 1 / ratio:.1f}x "
                     f"{word} than FRD-score ({timing['aad_default']['s_per_subject']:.3g} s vs "
                     f"{timing['frd']['s_per_subject']:.3g} s).")  # fmt: skip
    if v["frd_over_default_extraction_side_by_side"] is not None:
        sbs = result["side_by_side"]
        lines.append(f"* Side by side on {sbs['subjects']} reference subject(s), uncached, one "
                     f"input after the other: extraction "
                     + ", ".join(f"{k} {sec:.3g} s" for k, sec in sbs["s_per_subject"].items())
                     + f" per subject (FRD / aad-med default = "
                     f"{v['frd_over_default_extraction_side_by_side']:.1f}).")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint written by aad-train (not needed with --quick)")
    p.add_argument("--out", default="outputs/peers")
    p.add_argument("--data", help="folder of the synthetic pools (default OUT/data; reused; the "
                   "same names as scripts/sensitivity.py)")  # fmt: skip
    p.add_argument("--shape", type=int, nargs=3, default=[96, 104, 88])
    p.add_argument("--subjects", type=int, default=16, help="per cohort of a pair")
    p.add_argument("--repeats", type=int, default=20, help="pairs per shift")
    p.add_argument("--null-repeats", type=int, default=400,
                   help="same-site splits: half calibrate, half measure the FPR")  # fmt: skip
    p.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate")
    p.add_argument("--alpha", type=float, default=0.05, help="nominal level of the p-value rows")
    p.add_argument("--permutations", type=int, default=10000, help="aad-med's (stats=default)")
    p.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(sens.SHIFTS))
    p.add_argument(
        "--all-severities",
        action="store_true",
        help="also the milder severity of every shift (pools added after the target "
        "ones, which keep their names and caches)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHOD_KEYS), choices=list(METHOD_KEYS))
    p.add_argument("--frd-channels", nargs="+", choices=list(CHANNELS),
                   help="channels FRD-score reads (seconds per image each; default all four; t1 with --quick)")  # fmt: skip
    p.add_argument("--image-pool", type=int, default=8,
                   help="average-pooling of the images input of alibi and TorchDrift (voxels)")  # fmt: skip
    p.add_argument("--timing-subjects", type=int, default=4,
                   help="reference subjects every input is extracted from again, uncached and "
                   "one after the other, for side-by-side times")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny volumes and untrained encoder")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.shape, args.subjects, args.repeats, args.null_repeats = [24, 24, 20], 5, 4, 20
        args.permutations, args.shifts, args.image_pool = 99, ["noise", "population"], 4
        args.frd_channels = args.frd_channels or ["t1"]
        args.timing_subjects = 1
    elif not args.checkpoint:
        p.error("--checkpoint is required (or use --quick)")
    args.frd_channels = args.frd_channels or list(CHANNELS)
    if args.null_repeats < 2:
        p.error("--null-repeats must be at least 2 (half calibrate, half measure)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(args)
    result["verdicts"] = verdicts(result)
    out = Path(args.out)
    (out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    write_csv(out / "peers.csv", result)
    (out / "peers.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
