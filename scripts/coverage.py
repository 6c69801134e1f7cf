"""Coverage of the AAD confidence interval (``aad_ci95``) over simulated cohorts.

For every cell of a grid (subjects per cohort, dimension D, true distance, noise law) it draws
``--reps`` pairs of cohorts with a known distance ``θ = ||μ_A - μ_B||`` and records how often
the nominal 95% interval contains ``θ`` (with its Monte-Carlo standard error), how often it
contains 0 when ``θ = 0``, and its mean width relative to an oracle interval: the 2.5% and
97.5% quantiles of the bias-corrected estimate ``sqrt(max(0, aad2_unbiased))`` over the same
simulated data sets.

    python scripts/coverage.py --out outputs/coverage          # full grid, 1000 reps a cell
    python scripts/coverage.py --quick --out outputs/coverage  # a few cells, 200 reps

The intervals are computed with :func:`aad_med.distances.interval.interval_from_moments`
(vectorised over repetitions); ``--via compare`` computes every one through
:func:`aad_med.distances.compare_embeddings` instead, and ``--check-compare K`` recomputes the
first K repetitions of every cell through it and stops if any interval differs. Noise: each
dimension has unit variance, Gaussian or Student t with 3 df (scaled to unit variance); the
shift is spread evenly over the dimensions (``--anisotropic``: variances falling linearly from
3 to 0.2, mean 1, and the whole shift along the largest-variance axis, the hardest case).
True distances are multiples of the noise scale ``(2 Σσ⁴)^(1/4) sqrt(1/n_A + 1/n_B)`` of the
squared distance, so 0.5 is hard to detect and 4 is always detected.

Writes ``coverage.json`` and ``coverage.md`` (the table in BENCHMARKS.md) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from aad_med.distances import compare_embeddings
from aad_med.distances.interval import DistanceMoments, distance_moments, interval_from_moments

SIZES = [(12, 12), (20, 20), (50, 50), (100, 100), (8, 30)]
DIMS = [8, 32, 64, 256]
MULTIPLES = [0.0, 0.5, 1.0, 1.5, 2.5, 4.0]
LAWS = ["gaussian", "t3"]
QUICK = dict(sizes=[(12, 12), (8, 30)], dims=[8, 256], laws=LAWS, reps=200)


def _noise(rng: np.random.Generator, law: str, shape: tuple[int, ...]) -> np.ndarray:
    if law == "gaussian":
        return rng.standard_normal(shape)
    return rng.standard_t(3, shape) / np.sqrt(3.0)


def cell(
    n_a: int,
    n_b: int,
    dim: int,
    multiple: float,
    law: str,
    reps: int,
    seed: int,
    anisotropic: bool = False,
    via_compare: bool = False,
    check_compare: int = 0,
) -> dict:
    """Simulates one grid cell and returns its coverage, width ratio and their errors."""
    rng = np.random.default_rng(seed)
    sd = np.ones(dim)
    if anisotropic:
        sd = np.sqrt(np.linspace(3.0, 0.2, dim))
        sd *= np.sqrt(dim / np.sum(sd**2))
    scale = (2.0 * np.sum(sd**4)) ** 0.25 * np.sqrt(1.0 / n_a + 1.0 / n_b)
    theta = multiple * scale
    shift = np.zeros(dim)
    if anisotropic:
        shift[0] = theta
    else:
        shift[:] = theta / np.sqrt(dim)
    moments, lo_c, hi_c = [], [], []
    for r in range(reps):
        a = _noise(rng, law, (n_a, dim)) * sd + shift
        b = _noise(rng, law, (n_b, dim)) * sd
        moments.append(distance_moments(a, b))
        if via_compare or r < check_compare:
            ci = compare_embeddings(
                {"a": a, "b": b}, n_permutations=1, n_bootstrap=1, seed=r, tests=("aad",)
            )["pairs"][0]["aad_ci95"]
            lo_c.append(ci[0])
            hi_c.append(ci[1])
    stacked = DistanceMoments(
        **{f.name: np.array([getattr(m, f.name) for m in moments]) for f in fields(DistanceMoments)}
    )
    if via_compare:
        lo, hi = np.array(lo_c), np.array(hi_c)
    else:
        lo, hi = interval_from_moments(stacked)
        if check_compare:
            k = len(lo_c)
            diff = max(np.max(np.abs(lo[:k] - lo_c)), np.max(np.abs(hi[:k] - hi_c)))
            if diff > 1e-12 * max(1.0, float(np.max(hi[:k]))):
                raise SystemExit(f"compare_embeddings gave another interval (max diff {diff:.3g})")
    estimate = np.sqrt(np.maximum(stacked.u, 0.0))
    oracle = np.quantile(estimate, [0.025, 0.975])
    covered = (lo <= theta) & (theta <= hi)
    contains_zero = lo <= 0.0
    width = hi - lo
    oracle_width = float(oracle[1] - oracle[0])
    cov = float(covered.mean())
    return {
        "n_a": n_a,
        "n_b": n_b,
        "dim": dim,
        "law": law,
        "multiple": multiple,
        "theta": float(theta),
        "reps": reps,
        "coverage": cov,
        "coverage_se": float(np.sqrt(cov * (1 - cov) / reps)),
        "contains_zero": float(contains_zero.mean()),
        "lower_le_estimate": float(np.mean(lo <= estimate)),
        "mean_width": float(width.mean()),
        "oracle": [float(v) for v in oracle],
        "width_ratio": float(width.mean() / oracle_width) if oracle_width > 0 else None,
        "width_ratio_se": float(width.std(ddof=1) / np.sqrt(reps) / oracle_width)
        if oracle_width > 0
        else None,
        "checked_via_compare": len(lo_c),
    }


def summary(cells: list[dict]) -> dict:
    """Worst cells against the targets of issue 14."""
    pos = [c for c in cells if c["multiple"] > 0]
    zero = [c for c in cells if c["multiple"] == 0]
    worst = min(pos, key=lambda c: c["coverage"]) if pos else None
    widest = max(cells, key=lambda c: c["width_ratio"] or 0.0)
    return {
        "min_coverage_theta_pos": worst["coverage"] if worst else None,
        "min_coverage_cell": worst,
        "cells_below_093": sum(c["coverage"] < 0.93 for c in pos),
        "n_cells_theta_pos": len(pos),
        "min_contains_zero_theta0": min(c["contains_zero"] for c in zero) if zero else None,
        "min_lower_le_estimate_theta0": min(c["lower_le_estimate"] for c in zero) if zero else None,
        "max_width_ratio": widest["width_ratio"],
        "max_width_ratio_cell": widest,
        "cells_width_above_15": sum((c["width_ratio"] or 0) > 1.5 for c in cells),
    }


def markdown(cells: list[dict], info: dict) -> str:
    """The BENCHMARKS.md table: coverage (width / oracle width) per cell."""
    mults = sorted({c["multiple"] for c in cells})
    head = "| noise | n_A | n_B | D | " + " | ".join(f"θ = {m:g}·s" for m in mults) + " |"
    lines = [head, "|" + "---|" * (4 + len(mults))]
    keys = sorted({(c["law"], c["n_a"], c["n_b"], c["dim"]) for c in cells},
                  key=lambda k: (k[0], k[1] == 8, k[1], k[3]))  # fmt: skip
    by = {(c["law"], c["n_a"], c["n_b"], c["dim"], c["multiple"]): c for c in cells}
    for k in keys:
        row = []
        for m in mults:
            c = by.get((*k, m))
            if c is None:
                row.append("")
                continue
            cov = c["contains_zero"] if m == 0 else c["coverage"]
            mark = "**" if (m > 0 and cov < 0.93) or (c["width_ratio"] or 0) > 1.5 else ""
            row.append(f"{mark}{cov:.3f} ({c['width_ratio']:.2f}){mark}")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(row) + " |")
    s = info["summary"]
    lines += [
        "",
        f"{info['reps']} repetitions a cell (Monte-Carlo SE of a 0.95 coverage: "
        f"{np.sqrt(0.95 * 0.05 / info['reps']):.3f}); θ = 0 column: share of intervals "
        "containing 0; other columns: share containing θ; in brackets mean width / oracle width. "
        f"s = noise scale (see scripts/coverage.py). Bold: below 0.93 or wider than 1.5x.",
        "",
        f"Min coverage over θ > 0: {s['min_coverage_theta_pos']:.3f} "
        f"({s['cells_below_093']} of {s['n_cells_theta_pos']} cells below 0.93); "
        f"θ = 0 intervals containing 0: min {s['min_contains_zero_theta0']:.3f}; "
        f"max width ratio {s['max_width_ratio']:.2f} ({s['cells_width_above_15']} cells above "
        f"1.5); {info['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="outputs/coverage")
    p.add_argument("--quick", action="store_true", help="a few cells, 200 repetitions")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anisotropic", action="store_true")
    p.add_argument("--via", choices=["core", "compare"], default="core")
    p.add_argument("--check-compare", type=int, default=0, metavar="K")
    args = p.parse_args()
    sizes, dims, laws, reps = SIZES, DIMS, LAWS, 1000
    if args.quick:
        sizes, dims, laws, reps = QUICK["sizes"], QUICK["dims"], QUICK["laws"], QUICK["reps"]
    reps = args.reps or reps
    start = time.perf_counter()
    cells = []
    index = 0
    for law in laws:
        for n_a, n_b in sizes:
            for dim in dims:
                for mult in MULTIPLES:
                    cells.append(
                        cell(
                            n_a,
                            n_b,
                            dim,
                            mult,
                            law,
                            reps,
                            seed=[args.seed, index],
                            anisotropic=args.anisotropic,
                            via_compare=args.via == "compare",
                            check_compare=args.check_compare,
                        )  # fmt: skip
                    )
                    index += 1
                last = cells[-6:]
                print(law, n_a, n_b, dim, " ".join(f"{c['coverage']:.3f}" for c in last),
                      flush=True)  # fmt: skip
    info = {
        "reps": reps,
        "seed": args.seed,
        "anisotropic": args.anisotropic,
        "via": args.via,
        "check_compare": args.check_compare,
        "seconds": time.perf_counter() - start,
        "cells": cells,
    }
    info["summary"] = summary(cells)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coverage.json").write_text(json.dumps(info, indent=1))
    (out / "coverage.md").write_text(markdown(cells, info))
    print(markdown(cells, info))


if __name__ == "__main__":
    main()
