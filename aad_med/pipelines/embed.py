"""The body of ``aad-embed``: cohorts to per-subject vectors, sharded over torchrun ranks.

Run by :mod:`aad_med.cli.embed`; the sharding and gathering are
:func:`aad_med.embedding.distributed.embed_cohorts_distributed`. Computes no statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aad_med.data.records import Cohort
from aad_med.device import resolve_device
from aad_med.embedding.distributed import (
    DEFAULT_TIMEOUT_S,
    ReportedOnRankZero,
    embed_cohorts_distributed,
    from_main,
    on_every_rank,
)
from aad_med.embedding.encode import CohortEmbedding, EmbedSettings
from aad_med.errors import AADError
from aad_med.io_utils import file_digest, write_json_atomic
from aad_med.provenance import provenance

PROG = "aad-embed"


def run_embedding(
    checkpoint: str | Path,
    cohort_paths: Mapping[str, str | Path],
    out_dir: str | Path,
    settings: EmbedSettings | None = None,
    skip_invalid: bool = False,
) -> dict[str, CohortEmbedding]:
    """Encode cohorts with a checkpoint over every torchrun rank (one process without torchrun);
    rank 0 writes ``embeddings.csv``, ``embeddings.npz`` and ``provenance.json`` into
    ``out_dir``.

    Args:
        checkpoint: a checkpoint written by ``aad-train``.
        cohort_paths: ``{name: folder or CSV manifest}``.
        out_dir: output folder (created).
        settings: embedding options (device ``auto`` by default: this rank's GPU); with a
            ``cache_dir`` the checkpoint's hash is filled in.
        skip_invalid: leave invalid subjects out instead of stopping.

    Returns:
        ``{name: CohortEmbedding}``, the same on every rank.

    Raises:
        AADError: an input problem (on rank 0; other ranks raise
            :class:`~aad_med.embedding.distributed.ReportedOnRankZero`).
    """
    from aad_med.data.validation import load_cohort
    from aad_med.embedding.io import write_embeddings_csv, write_embeddings_npz
    from aad_med.training.checkpoint import load_model_from_checkpoint
    from aad_med.training.distributed import cleanup_distributed, setup_distributed

    s = settings if settings is not None else EmbedSettings(device="auto")
    info = setup_distributed("cpu" if str(s.device) == "cpu" else "auto", DEFAULT_TIMEOUT_S)
    try:
        device = on_every_rank(lambda: resolve_device(s.device))
        model, preprocessing, _ = on_every_rank(
            lambda: load_model_from_checkpoint(checkpoint, device)
        )
        cohorts: dict[str, Cohort] = {}
        if info.is_main:
            try:
                cohorts = {
                    n: load_cohort(p, skip_invalid=skip_invalid) for n, p in cohort_paths.items()
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
        checkpoint_hash = file_digest(checkpoint) if s.cache_dir else None
        s = dataclasses.replace(s, device=device, checkpoint_hash=checkpoint_hash)
        embs = embed_cohorts_distributed(model, cohorts, preprocessing, s)
        if info.is_main:
            out = Path(out_dir)
            write_embeddings_csv(out / "embeddings.csv", embs)
            write_embeddings_npz(out / "embeddings.npz", embs)
            write_json_atomic(out / "provenance.json", provenance(checkpoint))
            n = sum(len(e) for e in embs.values())
            print(
                f"{PROG}: {n} subjects of {len(embs)} cohorts encoded by {info.world_size} "
                f"process(es); wrote {out / 'embeddings.csv'}"
            )
    finally:
        cleanup_distributed()
    return embs
