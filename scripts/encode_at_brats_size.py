"""Encoding at BraTS size, side by side: ``aad-compare`` on two cohorts of 240x240x155 int16
phantoms (four channels and a seg, ``.nii.gz``) against the time nibabel with the standard zlib
takes just to load the same four channels, for this tree and, with ``--old``, another checkout.

    python scripts/encode_at_brats_size.py --out outputs/encode_brats --subjects 8 \
        [--old /tmp/old]  # a worktree of the code before the change

Measures, one thread each (OMP_NUM_THREADS=1), every command a fresh process:

- ``decode``: ``nib.load(path).get_fdata(dtype=float32)`` of the four channels (stdlib zlib);
- ``aad-compare`` with a negligible encoder (channels 4/4/4, latent 4, ``features=latent``) on
  2 x N subjects minus the same command on 2 x 2 small subjects (start-up, statistics,
  figures): cache off (both trees), first run with an empty cache, second run with another
  checkpoint (this tree);
- the default encoder (``configs/model/conv_ae.yaml``, default features), cache off.

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
    from aad_med.training.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, save_checkpoint

    torch.manual_seed(seed)
    m = ConvAutoencoder(patch_size=32, **model)
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_state": m.state_dict(),
        "model_config": m.model_config(),
        "preprocessing": PreprocessingConfig(patch_size=32).to_dict(),
        "train_subject_ids": [],
        "train_subjects": [],
    }
    return save_checkpoint(path, state)


def env_for(tree: Path, cache: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = str(tree)
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
        "device=cpu",
        "embedding.progress=false",
        f"hydra.run.dir={out}",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_for(tree, cache))
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
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    n = args.subjects
    data = out / "data"
    if not (data / "b").is_dir():
        phantoms(data / "a", n, 0)
        phantoms(data / "b", n, 1)
        phantoms(data / "ta", 2, 2, shape=(64, 64, 48))
        phantoms(data / "tb", 2, 3, shape=(64, 64, 48))
        phantoms(data / "da", args.default_subjects, 4)
        phantoms(data / "db", args.default_subjects, 5)
    tiny = dict(channels=(4, 4, 4), latent_dim=4)
    ck = [checkpoint(out / f"tiny{i}.pt", i, **tiny) for i in range(2)]
    ck_default = checkpoint(out / "default.pt", 0)
    res: dict = {"subjects_per_cohort": n, "shape": [240, 240, 155]}
    res["decode_s_per_subject"] = decode_seconds([data / "a", data / "b"])
    trees = {"new": REPO} | ({"old": args.old} if args.old else {})
    lat = ["embedding.features=latent", "regional=false", "decode_means=false"]

    def per_subject(tree, ckpt, cache, extra, cohorts=("a", "b"), small=("ta", "tb"), k=2 * n):
        tag = f"{tree.name}-{time.perf_counter_ns()}"
        big = compare(
            tree, ckpt, data / cohorts[0], data / cohorts[1], out / f"r-{tag}", cache, *extra
        )
        start = compare(
            tree, ckpt, data / small[0], data / small[1], out / f"s-{tag}", cache, *extra
        )
        return (big - start) / (k - 4), big, start

    for name, tree in trees.items():
        off = ["embedding.cache=false"] if name == "old" else ["cache=off"]
        s, big, start = per_subject(tree, ck[0], out / f"cache-off-{name}", off + lat)
        res[f"{name}_cache_off_s_per_subject"] = s
        res[f"{name}_cache_off_wall"] = [big, start]
    cache = out / "cache-new"
    shutil.rmtree(cache, ignore_errors=True)
    # First run fills the cache (the small cohorts are preprocessed there too).
    s1, big1, start1 = per_subject(REPO, ck[0], cache, lat)
    s2, big2, start2 = per_subject(REPO, ck[1], cache, lat)
    res.update(
        new_first_s_per_subject=s1,
        new_second_other_checkpoint_s_per_subject=s2,
        new_first_wall=[big1, start1],
        new_second_wall=[big2, start2],
        second_vs_first_speedup=(big1 - start1) / max(big2 - start2, 1e-9),
    )
    res["data_path_vs_decode"] = {
        k: res[f"{k}_cache_off_s_per_subject"] / res["decode_s_per_subject"] for k in trees
    }
    res["data_path_first_run_vs_decode"] = s1 / res["decode_s_per_subject"]
    for run in sorted(out.glob("r-wt-scale-*")) + sorted(out.glob("r-" + REPO.name + "-*")):
        doc = json.loads((run / "distances.json").read_text())
        res.setdefault("timings", {})[run.name] = doc.get("timings")
    for name, tree in trees.items():
        off = ["embedding.cache=false"] if name == "old" else ["cache=off"]
        s, big, start = per_subject(
            tree,
            ck_default,
            out / f"cache-off-{name}",
            off,
            ("da", "db"),
            k=2 * args.default_subjects,
        )
        res[f"{name}_default_encoder_s_per_subject"] = s
    if "old" in trees:
        res["default_encoder_speedup"] = (
            res["old_default_encoder_s_per_subject"] / res["new_default_encoder_s_per_subject"]
        )
        res["cache_off_speedup"] = (
            res["old_cache_off_s_per_subject"] / res["new_cache_off_s_per_subject"]
        )
    (out / "encode_brats.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
