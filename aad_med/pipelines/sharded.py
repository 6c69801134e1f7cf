"""``aad-compare`` under ``torchrun --nproc_per_node=N``: the encoding is sharded over the ranks,
everything else happens on rank 0.

Rank 0 runs :func:`aad_med.pipelines.compare.run_comparison` unchanged; its embedding step
(:func:`embed`) tells the other ranks which checkpoint and settings to encode with, and
:func:`aad_med.embedding.distributed.embed_cohorts_distributed` splits each cohort's subjects
over all ranks and gathers the vectors back in cohort order. Each subject is encoded alone, so
``distances.json`` (less its ``timings``, ``created`` and ``provenance.command``) and
``embeddings.csv`` are byte-identical to one process's. Ranks other than 0 compute no
statistics and write no output (the preprocessed-subject cache excepted) and exit 0; a failure
on rank 0 is reported there once, the others exit quietly.

The message protocol rank 0 broadcasts: ``("embed", checkpoint, settings)`` before each
encoder's sharded embedding, ``("done",)`` at the end, ``("error",)`` when rank 0 stops early.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from aad_med.errors import AADError

log = logging.getLogger("aad_med.compare")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def embed(model, cohorts, preprocessing, settings, checkpoint: str | Path):
    """One encoder's embedding of every cohort, sharded over the ranks when there are several
    (the call site of :func:`aad_med.pipelines.compare.run_comparison`, rank 0 only)."""
    from aad_med.embedding.cache import embed_cohorts
    from aad_med.embedding.distributed import embed_cohorts_distributed, from_main

    rank, world = _world()
    if world == 1:
        return embed_cohorts(model, cohorts, preprocessing, settings)
    from_main(("embed", str(checkpoint), settings))
    try:
        return embed_cohorts_distributed(model, cohorts, preprocessing, settings)
    except AADError as e:
        e.raised_on_every_rank = True  # the other ranks stopped too: no message to send
        raise


def _serve_shards(device) -> None:
    """Ranks > 0: encode this rank's shards until rank 0 says it is done (or failed)."""
    from aad_med.embedding.distributed import (
        ReportedOnRankZero,
        embed_cohorts_distributed,
        from_main,
    )
    from aad_med.training.checkpoint import load_model_from_checkpoint

    while True:
        msg = from_main(None)
        if msg[0] != "embed":
            return
        _, checkpoint, settings = msg
        if getattr(settings.device, "type", str(settings.device)) != "cpu":
            settings = dataclasses.replace(settings, device=device)  # this rank's GPU
        try:
            model, preprocessing, _ = load_model_from_checkpoint(checkpoint, settings.device)
        except AADError as e:  # rank 0 read the same file: it reports the problem
            raise ReportedOnRankZero(str(e)) from None
        # Rank 0's cohorts are broadcast inside; ``{}`` stands for them here.
        embed_cohorts_distributed(model, {}, preprocessing, settings)


def run_comparison_sharded(
    checkpoint: str | Path | Sequence[str | Path],
    cohort_paths: Mapping[str, str | Path],
    run_dir: str | Path,
    settings=None,
) -> dict | None:
    """:func:`aad_med.pipelines.compare.run_comparison`, sharded when launched by torchrun.

    Returns:
        The content of ``distances.json`` on rank 0 (and without torchrun), ``None`` on the
        other ranks.

    Raises:
        As ``run_comparison``, on rank 0; other ranks raise
        :class:`~aad_med.embedding.distributed.ReportedOnRankZero` when rank 0 failed.
    """
    from aad_med.embedding.distributed import DEFAULT_TIMEOUT_S, ReportedOnRankZero, from_main
    from aad_med.pipelines.compare import CompareSettings, run_comparison
    from aad_med.training.distributed import (
        cleanup_distributed,
        launched_by_torchrun,
        setup_distributed,
    )

    s = settings or CompareSettings()
    if not launched_by_torchrun():
        return run_comparison(checkpoint, cohort_paths, run_dir, s)
    info = setup_distributed("cpu" if str(s.device) == "cpu" else "auto", DEFAULT_TIMEOUT_S)
    try:
        if not info.distributed:
            return run_comparison(checkpoint, cohort_paths, run_dir, s)
        if not info.is_main:
            _serve_shards(info.device)
            return None
        try:
            result = run_comparison(checkpoint, cohort_paths, run_dir, s)
        except ReportedOnRankZero:
            raise
        except BaseException as e:
            if getattr(e, "raised_on_every_rank", False):
                raise
            # The other ranks wait for the next message: release them, then report here.
            from_main(("error",))
            raise
        from_main(("done",))
        return result
    finally:
        cleanup_distributed()
