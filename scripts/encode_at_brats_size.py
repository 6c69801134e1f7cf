"""Encoding at BraTS size, side by side: ``aad-compare`` on two cohorts of 240x240x155 int16
phantoms (four channels and a seg, ``.nii.gz``) against the time nibabel with the standard zlib
takes just to load the same four channels, for this tree and, with ``--old``, another checkout.

    python scripts/encode_at_brats_size.py --out outputs/encode_brats --subjects 8 \
        [--old /tmp/old]  # a worktree of the code before the change

Measures, one thread each (OMP_NUM_THREADS=1), every command a fresh process:

- ``decode``: ``nib.load(path).get_fdata(dtype=float32)`` of the four channels (stdlib zlib),
  at the start (the ratios' baseline) and again at the end, with the load average at both;
- ``aad-compare`` with a negligible encoder (channels 4/4/4, latent 4, ``features=latent``) on
  2 x N subjects minus the same command on 2 x 2 small subjects (start-up, statistics,
  figures), divided by the 2 x N BraTS-size subjects (the small subjects, 64x64x48, hold 1/40
  of a BraTS subject's voxels: their cost is start-up, not subjects), with the per-subject step
  (``subjects=true``, the default: image-quality metrics) and without it (``subjects=false``:
  the embedding's data path alone): cache off (both trees), first run with an empty cache,
  second run with another checkpoint (this tree);
- the default encoder (``configs/model/conv_ae.yaml``), cache off, on 2 x M subjects: the
  default features with the per-subject step (what a user runs), and ``multiscale+texture``
  (the default before issue 18) without it (the set-up of the first measurement).

- the default encoder with the preprocessed cache: a first comparison (empty cache) and a second
  one with another default-size checkpoint, with the per-subject step: the second-run ratio and
  the forward pass's share of it (``timings``) for the encoder users get.

``--quick-old`` leaves out the old tree's runs with the per-subject step (its image-quality
metrics take ~16 s per BraTS subject). ``--only tiny`` / ``--only default`` runs one half.
``--device cuda`` encodes on the GPU (the data path stays on one CPU thread, as measured here):
``scripts/gpu_checks.sh`` runs ``--device cuda --only default`` on a lent GPU.

The phantoms come from an independent generator (an ellipsoid brain with texture and noise),
not from :mod:`aad_med.data.synthetic`. Writes ``encode_brats.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ("t1", "t1ce", "t2", "flair")
DEVICE = "cpu"  # --device


def phantoms(root: Path, n: int, seed: int, shape=(240, 240, 155)) -> Path:
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for i in range(n):
        sid = f"BraTS2021_{i:05d}"
        d = root / sid
        d.mkdir(parents=True, exist_ok=True)
        c = np.array(shape) / 2 + rng.normal(0, 3, 3)
        s = np.array(shape) / np.array([240, 240, 155])
        r = (
            ((x - c[0]) / (70 * s[0])) ** 2
            + ((y - c[1]) / (90 * s[1])) ** 2
            + ((z - c[2]) / (60 * s[2])) ** 2
        )
        brain = r < 1
        for k, ch in enumerate(CHANNELS):
            texture = 80 * np.sin(x * 0.1 + k) * np.cos(y * 0.07) + rng.normal(0, 30, shape)
            v = np.zeros(shape, np.int16)
            v[brain] = np.clip((300 + 200 * k + texture)[brain], 1, None).astype(np.int16)
            nib.save(nib.Nifti1Image(v, np.eye(4)), d / f"{sid}_{ch}.nii.gz")
        seg = np.zeros(shape, np.int16)
        seg[r < 0.05] = 2
        nib.save(nib.Nifti1Image(seg, np.eye(4)), d / f"{sid}_seg.nii.gz")
    return root


def checkpoint(path: Path, seed: int, **model) -> Path:
    import torch

    from aad_med.data.preprocessing import PreprocessingConfig
    from aad_med.models import ConvAutoencoder
    from aad_med.training.checkpoint import save_model_checkpoint

    torch.manual_seed(seed)
    m = ConvAutoencoder(patch_size=32, **model)
    prep = PreprocessingConfig(patch_size=32).to_dict()
    return save_model_checkpoint(path, m, prep, train_subject_ids=[], train_subjects=[])


def env_for(tree: Path, cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    # The tree first; what PYTHONPATH held already (a GPU machine's staged packages) after it.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p
    )
    env["AAD_MED_CACHE"] = str(cache)
    return env


def compare(tree: Path, ckpt: Path, a: Path, b: Path, out: Path, cache: Path, *extra) -> float:
    cmd = [
        sys.executable,
        "-m",
        "aad_med.cli.compare",
        f"checkpoint={ckpt}",
        f"cohorts.a={a}",
        f"cohorts.b={b}",
        f"device={DEVICE}",
        "embedding.progress=false",
        f"hydra.run.dir={out}",
        *extra,
    ]
    t0 = time.perf_counter()
    # cwd=tree: ``python -m`` puts the working folder first on sys.path, ahead of PYTHONPATH,
    # so run from elsewhere the "old" tree would import this one's package.
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env_for(tree, cache), cwd=str(tree)
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def decode_seconds(cohorts: list[Path]) -> float:
    t0 = time.perf_counter()
    n = 0
    for root in cohorts:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for ch in CHANNELS:
                nib.load(str(sub / f"{sub.name}_{ch}.nii.gz")).get_fdata(dtype=np.float32)
            n += 1
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--old", type=Path, default=None, help="checkout of the code before")
    ap.add_argument("--default-subjects", type=int, default=4)
    ap.add_argument("--quick-old", action="store_true", help="old tree: no per-subject step runs")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the encoder's device)")
    ap.add_argument(
        "--only", choices=("tiny", "default"), default=None, help="one half of the runs"
    )
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    n = args.subjects
    data = out / "data"
    tiny_runs, default_runs_wanted = args.only != "default", args.only != "tiny"
    wanted = {"ta": (2, 2, (64, 64, 48)), "tb": (2, 3, (64, 64, 48))}
    if tiny_runs:
        wanted |= {"a": (n, 0, None), "b": (n, 1, None)}
    if default_runs_wanted:
        wanted |= {"da": (args.default_subjects, 4, None), "db": (args.default_subjects, 5, None)}
    for name, (count, seed, shape) in wanted.items():
        if not (data / name).is_dir():
            phantoms(data / name, count, seed, **({"shape": shape} if shape else {}))
    tiny = dict(channels=(4, 4, 4), latent_dim=4)
    ck = [checkpoint(out / f"tiny{i}.pt", i, **tiny) for i in range(2)]
    ck_default = [checkpoint(out / f"default{i}.pt", i) for i in range(2)]
    res: dict = {"subjects_per_cohort": n, "shape": [240, 240, 155], "runs": {}}
    res["device"] = DEVICE
    res["loadavg_start"] = os.getloadavg()
    baseline = [data / "a", data / "b"] if tiny_runs else [data / "da", data / "db"]
    res["decode_s_per_subject"] = decode_seconds(baseline)
    trees = {"new": REPO} | ({"old": args.old} if args.old else {})
    lat = ["embedding.features=latent", "regional=false", "decode_means=false"]
    step = {"subjects": ["subjects=true"], "nosubjects": ["subjects=false"]}

    def off(name):
        return ["embedding.cache=false"] if name == "old" else ["cache=off"]

    def per_subject(label, tree, ckpt, cache, extra, cohorts=("a", "b"), k=2 * n):
        run = out / f"r-{label}"
        small = out / f"s-{label}"
        for folder in (run, small):
            shutil.rmtree(folder, ignore_errors=True)
        big = compare(tree, ckpt, data / cohorts[0], data / cohorts[1], run, cache, *extra)
        start = compare(tree, ckpt, data / "ta", data / "tb", small, cache, *extra)
        doc = json.loads((run / "distances.json").read_text())
        res["runs"][label] = {
            "s_per_subject": (big - start) / k,
            "wall": [big, start],
            "timings": doc.get("timings"),
        }
        print(f"{label}: {(big - start) / k:.3f} s per subject", flush=True)
        return (big - start) / k

    for name, tree in trees.items() if tiny_runs else ():
        for st, flag in step.items():
            if name == "old" and st == "subjects" and args.quick_old:
                continue
            per_subject(
                f"{name}-off-{st}", tree, ck[0], out / f"cache-off-{name}", off(name) + lat + flag
            )
    for st, flag in step.items() if tiny_runs else ():
        cache = out / f"cache-new-{st}"
        shutil.rmtree(cache, ignore_errors=True)
        # First run fills the cache (the small cohorts are preprocessed there too).
        first = per_subject(f"new-first-{st}", REPO, ck[0], cache, lat + flag)
        second = per_subject(f"new-second-{st}", REPO, ck[1], cache, lat + flag)
        res[f"second_vs_first_speedup_{st}"] = first / max(second, 1e-9)
    default_runs = {
        "default-features-subjects": ["subjects=true"],
        "default-features-nosubjects": ["subjects=false"],
        "multiscale+texture-nosubjects": [
            "embedding.features=multiscale+texture",
            "subjects=false",
        ],
    }
    for name, tree in trees.items() if default_runs_wanted else ():
        for label, extra in default_runs.items():
            if name == "old" and label.endswith("-subjects") and args.quick_old:
                continue
            per_subject(
                f"{name}-default-encoder-{label}",
                tree,
                ck_default[0],
                out / f"cache-off-{name}",
                off(name) + extra,
                ("da", "db"),
                k=2 * args.default_subjects,
            )
    if default_runs_wanted:
        # The default encoder with the cache: a first comparison fills it, a second one with
        # another checkpoint of the same architecture reads it.
        cache = out / "cache-new-default"
        shutil.rmtree(cache, ignore_errors=True)
        m = 2 * args.default_subjects
        timed = {}
        for i, when in enumerate(("first", "second")):
            label = f"new-default-encoder-{when}-subjects"
            per_subject(label, REPO, ck_default[i], cache, ["subjects=true"], ("da", "db"), k=m)
            run = res["runs"][label]
            forward = ((run["timings"] or {}).get("seconds") or {}).get("forward")
            # The encoder's share of the subjects' time (start-up subtracted from the wall).
            run["forward_share"] = forward / (run["wall"][0] - run["wall"][1]) if forward else None
            timed[when] = run["s_per_subject"]
        res["second_vs_first_speedup_default_encoder"] = timed["first"] / max(timed["second"], 1e-9)
    dec = res["decode_s_per_subject"]
    res["vs_decode"] = {label: r["s_per_subject"] / dec for label, r in res["runs"].items()}
    # The decode baseline again at the end: shared cores drift during a run of many minutes.
    res["decode_s_per_subject_end"] = decode_seconds(baseline)
    res["loadavg_end"] = os.getloadavg()
    runs = res["runs"]
    if "old" in trees:
        res["new_vs_old_speedup"] = {
            label.removeprefix("new-"): runs[label.replace("new-", "old-", 1)]["s_per_subject"]
            / runs[label]["s_per_subject"]
            for label in runs
            if label.startswith("new-") and label.replace("new-", "old-", 1) in runs
        }
    (out / "encode_brats.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
