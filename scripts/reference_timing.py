"""Side-by-side timing: ``aad-compare reference=REF`` on a new cohort versus the same comparison
with both cohorts encoded (issue 15's target: less than half the time).

Both arms run :func:`aad_med.pipelines.compare.run_comparison` with the same statistics, the
embedding cache off (so nothing is reused between runs) and ``regional=false`` (a stored
reference has no patch positions, so the encoded arm must not make a map the other cannot), in
alternating order; the medians and their ratio are printed and written as JSON. The numbers of
the two arms are checked equal as well.

    python scripts/reference_timing.py --checkpoint runs/enc/checkpoints/best.pt --out bench/ref \\
        [--n 16] [--n-ref 48] [--shape 64 72 60] [--repeats 3]

With equal cohort sizes the ratio cannot go below 1/2 (the new cohort is still encoded and its
image-quality metrics computed), so the target needs a reference larger than the batch, the
usual monitoring case.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from aad_med.data.synthetic import generate_cohort
from aad_med.pipelines.compare import CompareSettings, run_comparison
from aad_med.pipelines.reference import ReferenceSettings, fit_reference


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=16, help="subjects of the new cohort")
    p.add_argument("--n-ref", type=int, default=None, help="reference subjects (default: --n)")
    p.add_argument("--shape", type=int, nargs=3, default=(64, 72, 60))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--permutations", type=int, default=2000)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_ref = args.n_ref or args.n
    data = out / f"data_{n_ref}_{args.n}_{'x'.join(map(str, args.shape))}"
    if not (data / "ref").exists():
        generate_cohort(data / "ref", n_ref, "reference", seed=3, shape=args.shape, id_prefix="R_")
        generate_cohort(data / "new", args.n, "site_b", seed=4, shape=args.shape, id_prefix="N_")
    for f in out.glob("REF.*"):
        f.unlink()
    t0 = time.perf_counter()
    ref = fit_reference(
        args.checkpoint,
        data / "ref",
        out / "REF",
        ReferenceSettings(cache=False, progress=False, device="cpu"),
    )
    fit_s = time.perf_counter() - t0
    common = dict(
        n_permutations=args.permutations,
        n_bootstrap=1000,
        cache=False,
        progress=False,
        regional=False,
        device="cpu",
        overwrite=True,
    )
    arms = {
        "both_encoded": lambda d: run_comparison(
            args.checkpoint,
            {"reference": data / "ref", "new": data / "new"},
            d,
            CompareSettings(**common),
        ),
        "stored_reference": lambda d: run_comparison(
            args.checkpoint,
            {"new": data / "new"},
            d,
            CompareSettings(**common, reference=str(ref.path)),
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    results = {}
    for _ in range(args.repeats):
        for name, fn in arms.items():
            d = out / name
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.perf_counter()
            results[name] = fn(d)
            times[name].append(time.perf_counter() - t0)
            print(name, f"{times[name][-1]:.1f} s", flush=True)
    a, b = results["both_encoded"]["pairs"][0], results["stored_reference"]["pairs"][0]
    same = all(abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(a[k])) for k in ("aad", "aad_p", "energy"))
    same_csv = (out / "both_encoded" / "subjects.csv").read_text() == (
        out / "stored_reference" / "subjects.csv"
    ).read_text()
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {
        "n_reference": n_ref,
        "n_new": args.n,
        "shape": list(args.shape),
        "checkpoint": str(args.checkpoint),
        "permutations": args.permutations,
        "repeats": args.repeats,
        "fit_seconds": fit_s,
        "seconds": times,
        "median_seconds": med,
        "ratio_stored_over_both": med["stored_reference"] / med["both_encoded"],
        "same_statistics": same,
        "same_subjects_csv": same_csv,
    }
    (out / f"reference_timing_{n_ref}_{args.n}.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
