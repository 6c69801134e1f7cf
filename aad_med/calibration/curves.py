"""Stage 7, calibration: AAD against artefact severity and cohort size (pure numpy).

For each repeat the subjects are shuffled and split into two disjoint halves; for each cohort
size ``n`` the first ``n`` of one half stay clean and the first ``n`` of the other half carry the
artefact (only ``round(fraction_affected * n)`` of them when ``fraction_affected < 1``). AAD,
the Mahalanobis distance of the means (``aad_mahalanobis``) and the permutation p-value come from :mod:`aad_med.distances`. Severity 0 is
the null: two clean halves. :func:`calibration_summary` averages repeats and
:func:`minimum_detectable` reads the power off the summary.

Embedding the shifted subjects is :mod:`~aad_med.calibration.conditions`; reading and writing
tables is :mod:`~aad_med.calibration.table`; translating an AAD into a severity is
:mod:`~aad_med.calibration.equivalence`; the whole run is :mod:`aad_med.pipelines.calibrate`.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from aad_med.data.artefacts import ARTEFACTS
from aad_med.distances.hotelling import mahalanobis_distance
from aad_med.distances.permutation import aad_permutation_test
from aad_med.errors import ConfigError

log = logging.getLogger("aad_med.calibrate")

CALIBRATION_COLUMNS: tuple[str, ...] = (
    "artefact",
    "severity",
    "n_per_cohort",
    "repeat",
    "fraction_affected",
    "n_affected",
    "aad",
    "aad_mahalanobis",
    "aad_p",
    "aad_null_median",
    "significant",
)
"""Columns of ``calibration.csv``, one row per (artefact, severity, n_per_cohort, repeat):
``n_affected`` subjects of the shifted cohort carry the artefact; ``significant`` is
``aad_p <= alpha``. Severity-0 rows (clean vs clean, the null) are repeated under every artefact
so each artefact's curve is complete on its own."""


@dataclass
class ConditionEmbeddings:
    """Every reference subject's vector under every (artefact, severity).

    Attributes:
        subject_ids: reference subjects, in cohort order.
        conditions: ``(artefact, severity)`` per condition; condition 0 is ``("none", 0.0)``.
        vectors: ``(n_conditions, n_subjects, dim)`` float64.
        seconds: wall time spent encoding.
    """

    subject_ids: list[str]
    conditions: list[tuple[str, float]]
    vectors: np.ndarray
    seconds: float = 0.0

    def index(self, artefact: str, severity: float) -> int:
        """Row of ``vectors`` for ``(artefact, severity)``; severity 0 is the clean condition."""
        if float(severity) == 0.0:
            return 0
        for i, (a, s) in enumerate(self.conditions):
            if a == artefact and math.isclose(s, float(severity), rel_tol=0, abs_tol=1e-12):
                return i
        raise KeyError(f"no embeddings for {artefact} at severity {severity}")


#: Detection rate regarded as "reliably detected" in the summary (the usual 80 % power).
TARGET_POWER = 0.8


def default_sizes(half: int) -> list[int]:
    """Up to three cohort sizes for a reference whose halves hold ``half`` subjects."""
    sizes = {half, max(2, half // 2), max(2, half // 4)}
    return sorted(s for s in sizes if 2 <= s <= half)


def check_sizes(n_per_cohort: Sequence[int] | None, n_subjects: int) -> list[int]:
    """The cohort sizes to run: all must fit in half the reference.

    Raises:
        ConfigError: fewer than 4 reference subjects, or a size above half of them.
    """
    half = n_subjects // 2
    if half < 2:
        raise ConfigError(
            f"the reference has {n_subjects} usable subject(s); calibration needs at least 4 "
            "(two disjoint halves of 2)"
        )
    if n_per_cohort is None:
        return default_sizes(half)
    sizes = sorted({int(n) for n in n_per_cohort})
    too_big = [n for n in sizes if n > half]
    if too_big:
        raise ConfigError(
            f"n_per_cohort {too_big} exceed half of the {n_subjects} reference subjects "
            f"({half}): the compared cohorts must be disjoint"
        )
    return sizes


def smallest_attainable_p(n: int) -> float:
    """The smallest exact permutation p-value of two cohorts of ``n``: the observed labelling
    and its swap give the same AAD, out of ``C(2n, n)`` labellings."""
    return min(1.0, 2.0 / math.comb(2 * int(n), int(n)))


def n_affected(n: int, fraction: float) -> int:
    """Subjects of a cohort of ``n`` that carry the artefact (at least one)."""
    return max(1, min(n, int(round(float(fraction) * n))))


def calibration_rows(
    emb: ConditionEmbeddings,
    ladders: Mapping[str, Sequence[float]],
    sizes: Sequence[int],
    repeats: int,
    fraction_affected: float = 1.0,
    n_permutations: int = 999,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[dict]:
    """One row (:data:`CALIBRATION_COLUMNS`) per (artefact, severity, n, repeat).

    The clean-vs-clean (severity 0) statistics of a (repeat, n) are computed once and copied
    under every artefact.
    """
    n_subjects = emb.vectors.shape[1]
    half = n_subjects // 2
    rows: list[dict] = []
    null_cache: dict[tuple[int, int], dict] = {}
    for repeat in range(int(repeats)):
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 1, repeat])).permutation(
            n_subjects
        )
        half_a, half_b = order[:half], order[half : 2 * half]
        for n in sizes:
            idx_a, idx_b = half_a[:n], half_b[:n]
            k = n_affected(n, fraction_affected)
            clean_a = emb.vectors[0, idx_a]
            for artefact, ladder in ladders.items():
                for severity in ladder:
                    key = (repeat, n)
                    if float(severity) == 0.0 and key in null_cache:
                        stats = null_cache[key]
                    else:
                        ci = emb.index(artefact, severity)
                        shifted = emb.vectors[0, idx_b].copy()
                        shifted[:k] = emb.vectors[ci, idx_b[:k]]
                        stats = _pair_stats(
                            clean_a,
                            shifted,
                            n_permutations,
                            np.random.SeedSequence([int(seed), 2, repeat, n, ci]),
                        )
                        if float(severity) == 0.0:
                            null_cache[key] = stats
                    rows.append(
                        {
                            "artefact": artefact,
                            "severity": float(severity),
                            "n_per_cohort": int(n),
                            "repeat": int(repeat),
                            "fraction_affected": float(fraction_affected),
                            "n_affected": 0 if float(severity) == 0.0 else k,
                            **stats,
                            "significant": bool(stats["aad_p"] <= alpha),
                        }
                    )
    return rows


def _pair_stats(a: np.ndarray, b: np.ndarray, n_permutations: int, seed) -> dict:
    test = aad_permutation_test(a, b, n_permutations=n_permutations, seed=seed)
    return {
        "aad": float(test.statistic),
        "aad_mahalanobis": float(mahalanobis_distance(a, b)),
        "aad_p": float(test.pvalue),
        "aad_null_median": float(np.median(test.null)),
    }


def _group(rows: Iterable[Mapping]) -> dict[tuple[str, float, int], list[Mapping]]:
    groups: dict[tuple[str, float, int], list[Mapping]] = defaultdict(list)
    for r in rows:
        groups[(str(r["artefact"]), float(r["severity"]), int(r["n_per_cohort"]))].append(r)
    return groups


def calibration_summary(rows: Iterable[Mapping], alpha: float = 0.05) -> list[dict]:
    """Repeats averaged per (artefact, severity, n_per_cohort).

    Returns:
        Dicts with ``artefact, severity, n_per_cohort, repeats, aad_mean, aad_ci95`` (2.5 and
        97.5 percentiles over repeats), ``aad_mahalanobis_mean``, ``aad_mahalanobis_ci95``,
        ``p_median`` and ``detection_rate`` (share of repeats with ``p <= alpha``), sorted by
        artefact order, n and severity.
    """
    out = []
    order = {a: i for i, a in enumerate(ARTEFACTS)}
    for (artefact, severity, n), group in _group(rows).items():
        aad_v = np.array([float(r["aad"]) for r in group])
        std_v = np.array([float(r["aad_mahalanobis"]) for r in group])
        p_v = np.array([float(r["aad_p"]) for r in group])
        out.append(
            {
                "artefact": artefact,
                "severity": severity,
                "n_per_cohort": n,
                "repeats": len(group),
                "aad_mean": float(aad_v.mean()),
                "aad_ci95": [float(v) for v in np.percentile(aad_v, [2.5, 97.5])],
                "aad_mahalanobis_mean": float(std_v.mean()),
                "aad_mahalanobis_ci95": [float(v) for v in np.percentile(std_v, [2.5, 97.5])],
                "p_median": float(np.median(p_v)),
                "detection_rate": float(np.mean(p_v <= alpha)),
            }
        )
    out.sort(
        key=lambda d: (
            order.get(d["artefact"], 99),
            d["artefact"],
            d["n_per_cohort"],
            d["severity"],
        )
    )
    return out


def minimum_detectable(summary: Iterable[Mapping], power: float = TARGET_POWER) -> dict:
    """Per artefact and cohort size, the smallest severity detected in at least ``power`` of
    the repeats (``None`` when no calibrated severity is)."""
    out: dict[str, dict[str, float | None]] = {}
    best: dict[tuple[str, int], float | None] = {}
    for s in summary:
        key = (s["artefact"], int(s["n_per_cohort"]))
        best.setdefault(key, None)
        if s["severity"] > 0 and s["detection_rate"] >= power:
            cur = best[key]
            best[key] = s["severity"] if cur is None else min(cur, s["severity"])
    for (artefact, n), sev in best.items():
        out.setdefault(artefact, {})[str(n)] = sev
    return out


# ---------------------------------------------------------------------------------------------
# Equivalent severity
