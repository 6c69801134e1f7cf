"""``aad-embed``: encode cohorts to per-subject vectors, sharded over torchrun processes
(thin entry point over :func:`aad_med.pipelines.embed.run_embedding`).

Example (rank 0 writes ``OUT/embeddings.csv``, ``OUT/embeddings.npz`` and
``OUT/provenance.json``)::

    torchrun --standalone --nproc_per_node=4 -m aad_med.cli.embed \\
        --checkpoint runs/train/checkpoints/best.pt \\
        --cohort site_a=data/site_a --cohort site_b=data/site_b --out outputs/embed

Without torchrun, ``aad-embed`` runs in one process. Expected failures print
``aad-embed: error: <line>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aad_med import DEFAULT_FEATURES, __version__
from aad_med.cli._errors import EXIT_INPUT_ERROR, run_reporting_errors
from aad_med.errors import ConfigError

PROG = "aad-embed"


def parse_cohorts(items: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR_OR_CSV`` items as ``{name: path}``.

    Raises:
        ConfigError: a malformed item or a name given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--cohort expects NAME=DIR_OR_CSV, got {item!r}")
        if name in out:
            raise ConfigError(f"cohort name {name!r} is given twice")
        out[name] = path
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Encode cohorts to per-subject vectors, sharded over torchrun processes; "
        "rank 0 writes OUT/embeddings.csv and OUT/embeddings.npz.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--checkpoint", required=True, help="checkpoint written by aad-train")
    p.add_argument(
        "--cohort",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a cohort folder or CSV manifest (repeat for each cohort)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda:LOCAL_RANK)")
    p.add_argument("--batch-size", type=int, default=None, help="patches per pass (default: 32)")
    p.add_argument("--num-workers", type=int, default=0, help="preprocessing workers per rank")
    p.add_argument(
        "--features", default=DEFAULT_FEATURES, help=f"feature set (default: {DEFAULT_FEATURES})"
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="embedding cache folder ('default': $AAD_MED_CACHE/embeddings); off when omitted",
    )
    p.add_argument("--skip-invalid", action="store_true", help="leave invalid subjects out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on input errors, one line each)."""
    args = parser().parse_args(argv)

    def fn() -> int:
        from aad_med.embedding.cache import default_cache_dir
        from aad_med.embedding.distributed import ReportedOnRankZero
        from aad_med.embedding.encode import DEFAULT_BATCH_SIZE, EmbedSettings
        from aad_med.pipelines.embed import run_embedding

        cohorts = parse_cohorts(args.cohort)
        cache_dir = args.cache_dir
        if cache_dir == "default":
            cache_dir = default_cache_dir()
        settings = EmbedSettings(
            device=args.device,
            batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
            features=args.features,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            cache_dir=cache_dir,
        )
        try:
            run_embedding(args.checkpoint, cohorts, args.out, settings, args.skip_invalid)
        except ReportedOnRankZero:
            return EXIT_INPUT_ERROR
        return 0

    return run_reporting_errors(PROG, fn, verbose=args.verbose or None)


if __name__ == "__main__":
    sys.exit(main())
