"""The body of ``aad-embed``: cohorts to per-subject vectors, sharded over torchrun ranks.

Run by :mod:`aad_med.cli.embed`; the sharding and gathering are
:func:`aad_med.embedding.distributed.embed_cohorts_distributed`. Computes no statistics.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aad_med.data.records import Cohort
from aad_med.device import resolve_device
from aad_med.embedding.cache import default_cache_dir
from aad_med.embedding.distributed import (
    DEFAULT_TIMEOUT_S,
    ReportedOnRankZero,
    embed_cohorts_distributed,
    from_main,
    on_every_rank,
)
from aad_med.embedding.encode import DEFAULT_BATCH_SIZE, EmbedSettings
from aad_med.errors import AADError, ConfigError
from aad_med.io_utils import file_sha256, write_json_atomic
from aad_med.provenance import provenance

PROG = "aad-embed"


def _parse_cohorts(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--cohort expects NAME=DIR_OR_CSV, got {item!r}")
        if name in out:
            raise ConfigError(f"cohort name {name!r} is given twice")
        out[name] = path
    return out


def run_embedding(args: argparse.Namespace) -> int:
    """Encode ``args.cohort`` with ``args.checkpoint`` over every torchrun rank; rank 0 writes
    ``embeddings.csv``, ``embeddings.npz`` and ``provenance.json`` into ``args.out``.

    Raises:
        AADError: an input problem (on rank 0; other ranks raise
            :class:`~aad_med.embedding.distributed.ReportedOnRankZero`).
    """
    from aad_med.data.validation import load_cohort
    from aad_med.embedding.io import write_embeddings_csv, write_embeddings_npz
    from aad_med.training.checkpoint import load_model_from_checkpoint
    from aad_med.training.distributed import cleanup_distributed, setup_distributed

    paths = _parse_cohorts(args.cohort)
    info = setup_distributed("cpu" if str(args.device) == "cpu" else "auto", DEFAULT_TIMEOUT_S)
    try:
        device = on_every_rank(lambda: resolve_device(args.device))
        model, preprocessing, _ = on_every_rank(
            lambda: load_model_from_checkpoint(args.checkpoint, device)
        )
        cohorts: dict[str, Cohort] = {}
        if info.is_main:
            try:
                cohorts = {
                    n: load_cohort(p, skip_invalid=args.skip_invalid) for n, p in paths.items()
                }
                found: tuple[str, Any] = ("ok", cohorts)
            except AADError as e:
                found = ("error", e)
        else:
            found = ("ok", None)
        if info.distributed:
            found = from_main(found)
        if found[0] == "error":
            if info.is_main:
                raise found[1]
            raise ReportedOnRankZero(str(found[1]))
        cohorts = found[1]
        cache_dir = None
        if args.cache_dir:
            cache_dir = default_cache_dir() if args.cache_dir == "default" else args.cache_dir
        settings = EmbedSettings(
            device=device,
            batch_size=args.batch_size or DEFAULT_BATCH_SIZE,
            features=args.features,
            num_workers=args.num_workers,
            progress=not args.no_progress,
            checkpoint_hash=file_sha256(args.checkpoint) if cache_dir else None,
            cache_dir=cache_dir,
        )
        embs = embed_cohorts_distributed(model, cohorts, preprocessing, settings)
        if info.is_main:
            out = Path(args.out)
            write_embeddings_csv(out / "embeddings.csv", embs)
            write_embeddings_npz(out / "embeddings.npz", embs)
            write_json_atomic(out / "provenance.json", provenance(args.checkpoint))
            n = sum(len(e) for e in embs.values())
            print(
                f"{PROG}: {n} subjects of {len(embs)} cohorts encoded by {info.world_size} "
                f"process(es); wrote {out / 'embeddings.csv'}"
            )
    finally:
        cleanup_distributed()
    return 0


