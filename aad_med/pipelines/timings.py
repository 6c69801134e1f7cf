"""Where a comparison's wall time went: seconds per phase, logged and recorded in
``distances.json`` under ``timings`` (which therefore differs between two runs of one comparison;
the determinism checks drop it like ``provenance.command``).

Phases: ``decode`` (reading and inflating the volumes), ``preprocessing`` (orientation, crop,
z-score), ``fingerprint`` (raw intensity percentiles), ``quality`` (the image-quality metrics
of the per-subject step, from the same decoded volumes), ``cache_read``/``cache_write`` (the
preprocessed-subject cache), ``forward`` (the encoder), ``features`` (patch grid and feature
reduction), ``embedding_wait`` (the encoder waiting for data: the data-path time left after
overlapping it with encoding), ``embedding`` (the whole embedding step), ``validation`` (reading
and checking the cohorts before the embedding), ``statistics``, ``intensity`` (the fingerprint
statistic), ``subjects`` (the rest of the per-subject step: tables, thumbnails, plots),
``figures_report``, and ``total``. Data-path phases
measured in a prefetch thread or worker overlap with ``forward``, so phases need not add up to
``total``. Nothing here reads or writes files.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping

log = logging.getLogger("aad_med.compare")

EMBED_PHASES = {
    "decode": "decode",
    "preprocessing": "preprocessing",
    "fingerprint": "fingerprint",
    "quality": "quality",
    "cache_read": "cache_read",
    "cache_write": "cache_write",
    "forward": "forward",
    "features": "features",
    "wait": "embedding_wait",
}
"""Names of :attr:`aad_med.embedding.encode.CohortEmbedding.timings` phases in the record."""


class PhaseTimer:
    """Adds up seconds per phase: ``with timer.phase("statistics"): ...`` or :meth:`add`."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add_embedding(self, timings: Mapping[str, float]) -> None:
        """Fold one cohort's embedding timings in (:data:`EMBED_PHASES`)."""
        for key, name in EMBED_PHASES.items():
            if key in timings:
                self.add(name, timings[key])

    def record(self) -> dict:
        """``{"seconds": {phase: s}, "total": s}`` rounded to milliseconds, and logged."""
        total = time.perf_counter() - self.start
        out = {
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "total": round(total, 3),
        }
        log.info(
            "time per phase: %s (total %.2f s)",
            ", ".join(
                f"{k} {v:.2f} s" for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])
            ),
            total,
        )
        return out
