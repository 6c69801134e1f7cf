"""The end-to-end demo behind ``make demo``: synthetic sites -> trained encoder -> comparison.

1. ``aad-synth --preset demo`` writes four BraTS-2021-layout cohorts: ``train`` (mixed sites),
   ``site_a`` and ``site_a2`` (one site, different subjects) and ``site_b`` (another scanner and
   population, same anatomy seeds as ``site_a``).
2. ``aad-inspect`` prints their fingerprints.
3. ``aad-train`` fits a small autoencoder on ``train`` only.
4. ``aad-compare`` compares the three sites and writes the report and plots.

Everything lands under ``outputs/demo/`` (``--out`` to change). Sized to finish in minutes on two
CPU cores; pass ``--device cuda`` on a GPU machine (the default ``auto`` already picks it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(step: str, args: list[str], env: dict) -> None:
    print(f"\n== {step}\n$ {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env)
    if proc.returncode != 0:
        sys.exit(f"demo: step '{step}' failed with exit code {proc.returncode}")
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="outputs/demo", help="output folder (default outputs/demo)"
    )
    parser.add_argument("--n-subjects", type=int, default=12, help="subjects per compared site")
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 72, 60], metavar=("X", "Y", "Z"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--n-permutations", type=int, default=5000)
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    data, train_dir, compare_dir = out / "data", out / "train", out / "compare"
    env = dict(os.environ, AAD_MED_CACHE=str(out / "cache"), MPLBACKEND="Agg")
    py = [sys.executable, "-m"]
    shape = [str(s) for s in args.shape]

    if not (data / "site_b").is_dir():
        run(
            "synthetic cohorts",
            [
                *py,
                "aad_med.cli.synth",
                str(data),
                "--preset",
                "demo",
                "--n-subjects",
                str(args.n_subjects),
                "--shape",
                *shape,
            ],
            env,
        )
    sites = ["site_a", "site_a2", "site_b"]
    run(
        "fingerprints",
        [
            *py,
            "aad_med.cli.inspect",
            *[str(data / s) for s in sites],
            "--json",
            str(out / "fingerprints.json"),
        ],
        env,
    )
    checkpoint = train_dir / "checkpoints" / "best.pt"
    if not checkpoint.exists():
        run(
            "train the encoder",
            [
                *py,
                "aad_med.cli.train",
                f"data.cohorts=[{data / 'train'}]",
                "data.patch_size=16",
                "data.samples_per_subject=32",
                "model.channels=[16,32,64]",
                "model.strides=[2,2,2]",
                "model.latent_dim=32",
                f"trainer.max_epochs={args.epochs}",
                "trainer.batch_size=32",
                f"trainer.device={args.device}",
                "logger=tensorboard",
                f"hydra.run.dir={train_dir}",
            ],
            env,
        )
    if compare_dir.exists():
        # The demo's own earlier comparison: say so rather than replace it silently.
        print(f"demo: replacing the earlier demo comparison in {compare_dir}")
        shutil.rmtree(compare_dir)
    run(
        "compare the sites",
        [
            *py,
            "aad_med.cli.compare",
            f"checkpoint={checkpoint}",
            *[f"cohorts.{s}={data / s}" for s in sites],
            f"stats.n_permutations={args.n_permutations}",
            f"device={args.device}",
            f"hydra.run.dir={compare_dir}",
        ],
        env,
    )

    print(f"""
Done. Results are in {out}:
  fingerprints          {out / "fingerprints.json"}
  training run          {train_dir}  (loss_curve.png, reconstructions.png, tensorboard/)
  comparison report     {compare_dir / "report.html"}  (and report.md)
  statistics            {compare_dir / "distances.json"}
  the AAD plot          {compare_dir / "plots" / "latent_means.png"}
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
