"""Compare cohorts with a trained encoder from Python: the same steps as ``aad-compare``, one by
one, for users who want the numbers in their own scripts or notebooks.

    python scripts/compare_cohorts.py CHECKPOINT NAME=DIR_OR_CSV NAME=DIR_OR_CSV [...] \\
        [--out OUT] [--permutations 10000] [--bootstrap 2000]

(``aad_med.pipelines.compare.run_comparison`` does all of it, outputs included, in one call.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aad_med.data.validation import load_cohort
from aad_med.distances import compare_embeddings
from aad_med.embedding import EmbedSettings, embed_cohorts, file_sha256, write_embeddings_csv
from aad_med.plots.latent import plot_latent_means
from aad_med.plots.summaries import bootstrap_mean_bands
from aad_med.provenance import provenance
from aad_med.report.document import write_report
from aad_med.report.serialize import write_distances_json
from aad_med.report.text import interpret_pair
from aad_med.training.checkpoint import load_model_from_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("cohorts", nargs="+", metavar="NAME=PATH")
    p.add_argument("--out", default="outputs/compare_script")
    p.add_argument("--permutations", type=int, default=10_000)
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args()
    out = Path(args.out)

    # 1. The encoder and the preprocessing it was trained with.
    model, preprocessing, _ = load_model_from_checkpoint(args.checkpoint, "cpu")
    # 2. Cohorts: discovered and validated (every problem reported at once).
    cohorts = {}
    for item in args.cohorts:
        name, path = item.split("=", 1)
        cohorts[name] = load_cohort(path)
    # 3. One vector per subject (the default feature set, aad_med.DEFAULT_FEATURES, plus each
    #    subject's mean patch latent), cached by checkpoint and files.
    settings = EmbedSettings(
        device="auto", checkpoint_hash=file_sha256(args.checkpoint), cache_dir=out / "cache"
    )
    embs = embed_cohorts(model, cohorts, preprocessing, settings)
    write_embeddings_csv(out / "embeddings.csv", embs)
    # 4. AAD with permutation p-value, bootstrap CI, effect size and complementary tests.
    result = compare_embeddings(
        {n: e.vectors for n, e in embs.items()},
        n_permutations=args.permutations,
        n_bootstrap=args.bootstrap,
    )
    for pair in result["pairs"]:
        print(interpret_pair(pair, result["alpha"], len(result["pairs"])))
    # 5. The mission's figure and a report.
    means = {n: e.latent_means.mean(axis=0) for n, e in embs.items()}
    bands = {n: bootstrap_mean_bands(e.latent_means) for n, e in embs.items()}
    png = plot_latent_means(means, bands, out / "plots" / "latent_means.png")
    result["checkpoint"] = str(args.checkpoint)
    result["features"] = next(iter(embs.values())).features
    result["provenance"] = provenance(args.checkpoint)
    result["cohorts"] = {
        n: {**result["cohorts"][n], "path": str(c.path)} for n, c in cohorts.items()
    }
    write_distances_json(out / "distances.json", result)
    md, html = write_report(result, out, {"latent_means": png.relative_to(out)})
    print(f"report: {html}")


if __name__ == "__main__":
    main()
