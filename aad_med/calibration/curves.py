"""Stage 7, calibration: AAD against artefact severity and cohort size for one encoder.

How a calibration runs (:func:`run_calibration`):

1. Every reference subject is read once; for each (artefact, severity), including the clean
   severity 0, the artefact is applied to the RAW volume (:mod:`~aad_med.calibration.artefacts`),
   the rest of the checkpoint's preprocessing follows, and the subject is encoded on the
   evaluation patch grid. Each (subject, artefact, severity) is embedded exactly once and reused
   by every repeat and cohort size.
2. For each repeat the subjects are shuffled and split into two disjoint halves; for each cohort
   size ``n`` the first ``n`` of one half stay clean and the first ``n`` of the other half carry
   the artefact (only ``round(fraction_affected * n)`` of them when ``fraction_affected < 1``).
   AAD, standardised AAD and the permutation p-value come from :mod:`aad_med.distances`.
   Severity 0 is the null: two clean halves.
3. :func:`calibration_summary` averages repeats; :func:`equivalent_severity` inverts the mean
   AAD-vs-severity curve of each artefact (monotone by isotonic regression) to say which severity
   of each artefact an observed AAD corresponds to.

AAD values depend on the encoder: a calibration is valid only for the checkpoint it was made
with (recorded in ``calibration.json``), and its AAD scale is the one of ``aad-compare`` with
the same checkpoint and feature set.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from aad_med.calibration.artefacts import ARTEFACTS, apply_artefact, artefact_seed, severity_ladders
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.records import SubjectRecord
from aad_med.data.transforms import (
    AddBrainMaskd,
    SafeCompose,
    deterministic_transforms,
)
from aad_med.distances.hotelling import aad_standardized
from aad_med.distances.permutation import aad_permutation_test
from aad_med.embedding.cache import file_sha256
from aad_med.embedding.encode import check_model_matches, encode_subject, resolve_device
from aad_med.embedding.features import get_feature_set
from aad_med.errors import ConfigError, InputError

log = logging.getLogger("aad_med.calibrate")

CALIBRATION_COLUMNS: tuple[str, ...] = (
    "artefact",
    "severity",
    "n_per_cohort",
    "repeat",
    "fraction_affected",
    "n_affected",
    "aad",
    "aad_standardized",
    "aad_p",
    "aad_null_median",
    "significant",
)
"""Columns of ``calibration.csv``, one row per (artefact, severity, n_per_cohort, repeat):
``n_affected`` subjects of the shifted cohort carry the artefact; ``significant`` is
``aad_p <= alpha``. Severity-0 rows (clean vs clean, the null) are repeated under every artefact
so each artefact's curve is complete on its own."""

#: Detection rate regarded as "reliably detected" in the summary (the usual 80 % power).
TARGET_POWER = 0.8


@dataclass
class CalibrationSettings:
    """What a calibration run needs besides the checkpoint and the reference cohort.

    Attributes:
        artefacts: artefact names (see :data:`~aad_med.calibration.artefacts.ARTEFACTS`).
        severities: per-artefact severity ladders; missing artefacts use the defaults.
        n_per_cohort: cohort sizes to compare; ``None`` picks up to three sizes up to half
            the reference.
        repeats: random disjoint splits per (artefact, severity, n).
        fraction_affected: share of the shifted cohort's subjects that carry the artefact.
        n_permutations: label shuffles per permutation test.
        alpha: significance level of the detection rate.
        seed: seeds the splits, the permutations and every subject's artefact pattern.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: patches per forward pass.
        features: embedding feature set (``latent``: the AAD of ``aad-compare``).
        skip_invalid: leave invalid reference subjects out instead of stopping.
        max_subjects: use only the first this many reference subjects (``None``: all).
        progress: tqdm bar while encoding.
    """

    artefacts: Sequence[str] = tuple(ARTEFACTS)
    severities: Mapping[str, Sequence[float]] | None = None
    n_per_cohort: Sequence[int] | None = None
    repeats: int = 20
    fraction_affected: float = 1.0
    n_permutations: int = 999
    alpha: float = 0.05
    seed: int = 0
    device: str = "auto"
    batch_size: int = 32
    features: str = "latent"
    skip_invalid: bool = False
    max_subjects: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raises:
        ConfigError: a value out of range (the message names the key)."""
        if int(self.repeats) < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if not 0.0 < float(self.fraction_affected) <= 1.0:
            raise ConfigError(f"fraction_affected must be in (0, 1], got {self.fraction_affected}")
        if int(self.n_permutations) < 1:
            raise ConfigError(f"stats.n_permutations must be >= 1, got {self.n_permutations}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.max_subjects is not None and int(self.max_subjects) < 4:
            raise ConfigError(f"max_subjects must be >= 4 (or null), got {self.max_subjects}")
        if self.n_per_cohort is not None:
            bad = [n for n in self.n_per_cohort if int(n) < 2]
            if bad or not list(self.n_per_cohort):
                raise ConfigError(
                    f"n_per_cohort must list sizes >= 2 (or be null), got {list(self.n_per_cohort)}"
                )


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


# ---------------------------------------------------------------------------------------------
# Embedding shifted subjects


def split_preprocessing(preprocessing: PreprocessingConfig) -> tuple[SafeCompose, SafeCompose]:
    """The checkpoint's deterministic preprocessing cut after the brain mask: ``(read, finish)``.

    ``read`` loads the raw subject and records its brain mask (voxels non-zero in any channel of
    the clean volume); ``finish`` reorients, resamples, crops, z-scores and pads. Artefacts go in
    between, so they act on raw intensities but never move the brain crop.
    """
    steps = list(deterministic_transforms(preprocessing).transforms)
    cut = next((i for i, t in enumerate(steps) if isinstance(t, AddBrainMaskd)), None)
    if cut is None:
        raise RuntimeError("the preprocessing has no brain-mask step to insert artefacts after")
    return (
        SafeCompose(steps[: cut + 1], log_stats=False),
        SafeCompose(steps[cut + 1 :], log_stats=False),
    )


def encode_preprocessed(
    model: torch.nn.Module,
    item: Mapping[str, Any],
    preprocessing: PreprocessingConfig,
    device: torch.device,
    batch_size: int,
    feature_set,
) -> np.ndarray:
    """One preprocessed subject (keys of ``PREPROCESSED_KEYS``) -> its feature vector, on the
    same evaluation grid and with the same reduction as :func:`aad_med.embedding.embed_cohort`
    (both run :func:`aad_med.embedding.encode.encode_subject`)."""
    return encode_subject(model, item, preprocessing, device, batch_size, feature_set).vector


def _shifted_item(raw: Mapping[str, Any], artefact: str, severity: float, seed: int) -> dict:
    d = dict(raw)
    if severity == 0.0:
        d["image"] = raw["image"].clone()
    else:
        d["image"] = apply_artefact(raw["image"], artefact, severity, seed, brain=raw["brain"])
    d["seg"] = raw["seg"].clone()
    d["brain"] = raw["brain"].clone()
    return d


def embed_conditions(
    model: torch.nn.Module,
    records: Sequence[SubjectRecord],
    preprocessing: PreprocessingConfig,
    ladders: Mapping[str, Sequence[float]],
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    features: str = "latent",
    progress: bool = True,
) -> ConditionEmbeddings:
    """Encode every subject clean and under every (artefact, severity > 0) of ``ladders``.

    Each subject is read from disk once; memory holds one subject's raw volume at a time.

    Raises:
        CheckpointError: the model does not fit the preprocessing.
        InputError: a subject's file cannot be read (named).
    """
    device = resolve_device(device)
    check_model_matches(model, preprocessing)
    model = model.to(device).eval()
    feature_set = get_feature_set(features)
    conditions: list[tuple[str, float]] = [("none", 0.0)]
    for name, ladder in ladders.items():
        conditions.extend((name, float(s)) for s in ladder if float(s) > 0)
    read, finish = split_preprocessing(preprocessing)
    per_subject: list[np.ndarray] = []
    ids: list[str] = []
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(records) * len(conditions),
        desc="encoding shifted subjects",
        unit="volume",
        disable=None if progress else True,
        leave=False,
    )
    try:
        for record in records:
            raw = read(record.as_dict())
            vecs = []
            for artefact, severity in conditions:
                item = finish(
                    _shifted_item(
                        raw, artefact, severity, artefact_seed(seed, record.subject_id, artefact)
                    )
                )
                try:
                    vecs.append(
                        encode_preprocessed(
                            model, item, preprocessing, device, batch_size, feature_set
                        )
                    )
                except ValueError as e:
                    folder = Path(next(iter(record.images.values())).path).parent
                    raise InputError(folder, f"cannot be encoded ({e})") from None
                bar.update(1)
            per_subject.append(np.stack(vecs))
            ids.append(record.subject_id)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    vectors = np.stack(per_subject, axis=1)
    finalized = feature_set.finalize({str(i): vectors[i] for i in range(len(conditions))})
    vectors = np.stack([finalized[str(i)] for i in range(len(conditions))])
    log.info(
        "encoded %d subjects x %d conditions in %.1f s (%.2f volumes/s)",
        len(ids),
        len(conditions),
        seconds,
        len(ids) * len(conditions) / max(seconds, 1e-9),
    )
    return ConditionEmbeddings(ids, conditions, vectors.astype(np.float64), seconds)


# ---------------------------------------------------------------------------------------------
# Curves (pure numpy)


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
        "aad_standardized": float(aad_standardized(a, b)),
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
        97.5 percentiles over repeats), ``aad_standardized_mean``, ``aad_standardized_ci95``,
        ``p_median`` and ``detection_rate`` (share of repeats with ``p <= alpha``), sorted by
        artefact order, n and severity.
    """
    out = []
    order = {a: i for i, a in enumerate(ARTEFACTS)}
    for (artefact, severity, n), group in _group(rows).items():
        aad_v = np.array([float(r["aad"]) for r in group])
        std_v = np.array([float(r["aad_standardized"]) for r in group])
        p_v = np.array([float(r["aad_p"]) for r in group])
        out.append(
            {
                "artefact": artefact,
                "severity": severity,
                "n_per_cohort": n,
                "repeats": len(group),
                "aad_mean": float(aad_v.mean()),
                "aad_ci95": [float(v) for v in np.percentile(aad_v, [2.5, 97.5])],
                "aad_standardized_mean": float(std_v.mean()),
                "aad_standardized_ci95": [float(v) for v in np.percentile(std_v, [2.5, 97.5])],
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


def _isotonic(y: np.ndarray) -> np.ndarray:
    """Non-decreasing least-squares fit (pool adjacent violators), equal weights."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def read_calibration_table(source) -> list[dict]:
    """Calibration rows from ``calibration.csv``, a ``calibration.json`` (its ``rows``), a list of
    row dicts, or a mapping of columns.

    Raises:
        InputError: a file that cannot be read or lacks the columns.
        ConfigError: an in-memory table without the columns.
    """
    need = ("artefact", "severity", "n_per_cohort", "aad")
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(path, f"cannot read calibration ({e.strerror or e})") from None
        if path.suffix.lower() == ".json":
            try:
                rows = json.loads(text).get("rows")
            except (ValueError, AttributeError):
                rows = None
            if not isinstance(rows, list):
                raise InputError(path, "not a calibration.json (no 'rows' list)")
        else:
            rows = list(csv.DictReader(io.StringIO(text)))
            if not rows or any(c not in rows[0] for c in need):
                raise InputError(path, f"not a calibration table (needs columns {', '.join(need)})")
        return rows
    if isinstance(source, Mapping):
        missing = [c for c in need if c not in source]
        if missing:
            raise ConfigError(f"calibration table lacks column(s) {', '.join(missing)}")
        cols = {k: list(v) for k, v in source.items()}
        n = len(cols["aad"])
        return [{k: v[i] for k, v in cols.items()} for i in range(n)]
    rows = [dict(r) for r in source]
    if rows and any(c not in rows[0] for c in need):
        raise ConfigError(f"calibration rows lack column(s) among {', '.join(need)}")
    return rows


def _pick_size(available: Sequence[int], n_per_cohort: float | None) -> int:
    if n_per_cohort is None:
        return max(available)
    target = math.log(max(float(n_per_cohort), 1.0))
    return min(available, key=lambda n: (abs(math.log(n) - target), -n))


def equivalent_severity_details(
    calibration, aad_value: float, n_per_cohort: float | None = None, statistic: str = "aad"
) -> dict[str, dict]:
    """Like :func:`equivalent_severity`, with the evidence behind each answer.

    Returns:
        Per artefact: ``severity`` (float or ``None``), ``status`` (``"within"``: interpolated
        on the curve; ``"null"``: at or below the clean-vs-clean level, severity 0; ``"above"``:
        larger than the largest calibrated severity gives; ``"invisible"``: the artefact does not
        raise the statistic above the null spread at any calibrated severity), the
        ``n_per_cohort`` of the curve used, and the curve (``severities``, isotonic ``means``).
    """
    rows = read_calibration_table(calibration)
    if not rows:
        raise ConfigError("the calibration table is empty")
    value = float(aad_value)
    sizes = sorted({int(float(r["n_per_cohort"])) for r in rows})
    n = _pick_size(sizes, n_per_cohort)
    per: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if int(float(r["n_per_cohort"])) == n:
            per[str(r["artefact"])][float(r["severity"])].append(float(r[statistic]))
    out: dict[str, dict] = {}
    for artefact, by_sev in per.items():
        sev = np.array(sorted(by_sev))
        means = np.array([np.mean(by_sev[s]) for s in sev])
        fit = _isotonic(means)
        null_vals = np.asarray(by_sev.get(0.0, [fit[0]]))
        null_top = float(np.percentile(null_vals, 95)) if null_vals.size > 1 else float(fit[0])
        info = {
            "n_per_cohort": n,
            "severities": sev.tolist(),
            "means": fit.tolist(),
            "severity": None,
        }
        if sev.size < 2 or fit[-1] <= max(null_top, fit[0]) or fit[-1] <= fit[0]:
            info["status"] = "invisible"
        elif value <= fit[0]:
            info.update(status="null", severity=0.0)
        elif value > fit[-1]:
            info["status"] = "above"
        else:
            j = int(np.argmax(fit >= value))  # first point at or above the value
            lo_s, hi_s, lo_y, hi_y = sev[j - 1], sev[j], fit[j - 1], fit[j]
            frac = 0.0 if hi_y <= lo_y else (value - lo_y) / (hi_y - lo_y)
            info.update(status="within", severity=float(lo_s + frac * (hi_s - lo_s)))
        out[artefact] = info
    return out


def equivalent_severity(
    calibration, aad_value: float, n_per_cohort: float | None = None, statistic: str = "aad"
) -> dict[str, float | None]:
    """The severity of each calibrated artefact that gives, on average, the observed AAD.

    Inverts each artefact's mean AAD-vs-severity curve (made non-decreasing by isotonic
    regression) by linear interpolation.

    Args:
        calibration: ``calibration.csv`` / ``calibration.json`` path, or its rows / columns.
        aad_value: the observed AAD (of the same checkpoint and feature set).
        n_per_cohort: subjects per cohort of the observed comparison; the calibrated size
            nearest on a log scale is used (AAD is biased upwards in small cohorts). For unequal
            cohorts pass ``2 * n_a * n_b / (n_a + n_b)``. ``None``: the largest calibrated size.
        statistic: ``"aad"`` or ``"aad_standardized"``.

    Returns:
        ``{artefact: severity}``; ``0.0`` when the value is at or below the clean-vs-clean
        level, ``None`` when it lies above the calibrated range or the artefact never rises
        above the null (see :func:`equivalent_severity_details`).
    """
    details = equivalent_severity_details(calibration, aad_value, n_per_cohort, statistic)
    return {a: d["severity"] for a, d in details.items()}


def describe_equivalent_severity(
    calibration, aad_value: float, n_per_cohort: float | None = None, statistic: str = "aad"
) -> list[str]:
    """One sentence per artefact for a report, e.g. ``"noise: like severity 0.062 (noise
    sigma / median brain intensity of the channel), from the curve at 10 subjects per
    cohort"``."""
    lines = []
    for artefact, d in equivalent_severity_details(
        calibration, aad_value, n_per_cohort, statistic
    ).items():
        unit = ARTEFACTS[artefact].severity_unit if artefact in ARTEFACTS else "severity"
        top = d["severities"][-1]
        where = f"curve at {d['n_per_cohort']} subjects per cohort"
        if d["status"] == "within":
            text = f"like severity {d['severity']:.3g} ({unit})"
        elif d["status"] == "null":
            text = "no larger than two clean halves of the reference (severity 0)"
        elif d["status"] == "above":
            text = f"larger than the largest calibrated severity {top:.3g} ({unit}) gives"
        else:
            text = f"not comparable: up to severity {top:.3g} this artefact stays at the null level"
        lines.append(f"{artefact}: {text}; {where}")
    return lines


def equivalent_n(n_a: int, n_b: int) -> float:
    """Equal-size cohort with the same variance of the mean difference: ``2 n_a n_b / (n_a + n_b)``."""
    return 2.0 * n_a * n_b / max(n_a + n_b, 1)


def annotate_pairs(
    calibration,
    pairs: Iterable[Mapping],
    checkpoint_sha256: str | None = None,
) -> list[dict]:
    """Equivalent severities of every compared pair (``distances.json`` ``pairs``), for reports.

    Args:
        calibration: ``calibration.json`` / ``calibration.csv`` path or rows.
        pairs: dicts with ``a``, ``b``, ``aad`` and ``n_a``, ``n_b``.
        checkpoint_sha256: the comparison's checkpoint hash; when ``calibration`` is a
            ``calibration.json`` made with another checkpoint, each entry carries a warning (AAD
            scales differ between encoders).

    Returns:
        Per pair: ``a, b, aad, n_per_cohort`` (the equal-size equivalent of ``n_a, n_b``),
        ``equivalent_severity`` (:func:`equivalent_severity`), ``statements``
        (:func:`describe_equivalent_severity`) and ``warning`` (``None`` or one line).
    """
    warning = None
    if checkpoint_sha256 is not None and isinstance(calibration, str | os.PathLike):
        path = Path(calibration)
        if path.suffix.lower() == ".json":
            try:
                made_with = json.loads(path.read_text(encoding="utf-8")).get("checkpoint_sha256")
            except (OSError, ValueError, AttributeError):
                made_with = None
            if made_with and made_with != checkpoint_sha256:
                warning = (
                    f"{path}: calibration was made with another checkpoint; its AAD scale does "
                    "not apply to this comparison"
                )
    rows = read_calibration_table(calibration)
    out = []
    for pair in pairs:
        n = equivalent_n(int(pair["n_a"]), int(pair["n_b"]))
        value = float(pair["aad"])
        out.append(
            {
                "a": pair["a"],
                "b": pair["b"],
                "aad": value,
                "n_per_cohort": n,
                "equivalent_severity": equivalent_severity(rows, value, n),
                "statements": describe_equivalent_severity(rows, value, n),
                "warning": warning,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Whole run


def load_reference(
    reference: str | Path, skip_invalid: bool = False, max_subjects: int | None = None
):
    """Discover and validate the reference cohort.

    Raises:
        CohortError: invalid subjects (all listed). ConfigError: fewer than 4 subjects.
    """
    from aad_med.data.validation import load_cohort

    cohort = load_cohort(reference, skip_invalid=skip_invalid)
    if max_subjects is not None:
        cohort.subjects = list(cohort.subjects)[: int(max_subjects)]
    check_sizes(None, len(cohort.subjects))
    return cohort


def run_calibration(
    checkpoint: str | Path,
    reference: str | Path,
    settings: CalibrationSettings | None = None,
    on_embedded: Callable[[ConditionEmbeddings], None] | None = None,
) -> dict:
    """Calibrate a checkpoint's AAD on a reference cohort (nothing is written).

    Returns:
        A dict with ``rows`` (:data:`CALIBRATION_COLUMNS`), ``summary``
        (:func:`calibration_summary`), ``minimum_detectable``, ``embeddings``
        (:class:`ConditionEmbeddings`) and ``meta`` (settings, checkpoint, reference, timing).

    Raises:
        CheckpointError, CohortError, ConfigError, InputError: one line per problem.
    """
    from aad_med.training.checkpoint import load_model_from_checkpoint

    settings = settings or CalibrationSettings()
    settings.check()
    ladders = severity_ladders(list(settings.artefacts), settings.severities)
    cohort = load_reference(reference, settings.skip_invalid, settings.max_subjects)
    sizes = check_sizes(settings.n_per_cohort, len(cohort.subjects))
    floor = {n: smallest_attainable_p(n) for n in sizes}
    blind = [n for n, p in floor.items() if p > settings.alpha]
    if blind:
        log.warning(
            "with %s subjects per cohort no shift can reach p <= %g (the smallest possible "
            "permutation p is %s): their detection rate is 0 by construction",
            ", ".join(map(str, blind)),
            settings.alpha,
            ", ".join(f"{floor[n]:.3g}" for n in blind),
        )
    device = resolve_device(settings.device)
    model, preprocessing, ckpt = load_model_from_checkpoint(checkpoint, device)
    overlap = sorted(set(ckpt.get("train_subject_ids") or []) & set(cohort.subject_ids))
    if overlap:
        log.warning(
            "%d reference subject(s) were used to train this checkpoint (e.g. %s): their "
            "embeddings may be tighter than those of unseen data",
            len(overlap),
            overlap[0],
        )
    emb = embed_conditions(
        model,
        cohort.subjects,
        preprocessing,
        ladders,
        seed=settings.seed,
        device=device,
        batch_size=settings.batch_size,
        features=settings.features,
        progress=settings.progress,
    )
    if on_embedded is not None:
        on_embedded(emb)
    t0 = time.perf_counter()
    rows = calibration_rows(
        emb,
        ladders,
        sizes,
        settings.repeats,
        settings.fraction_affected,
        settings.n_permutations,
        settings.alpha,
        settings.seed,
    )
    summary = calibration_summary(rows, settings.alpha)
    meta = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "reference": str(reference),
        "n_reference_subjects": len(cohort.subjects),
        "reference_subject_ids": cohort.subject_ids,
        "reference_skipped": [str(s) for s in getattr(cohort, "skipped", [])],
        "train_overlap": overlap,
        "preprocessing": preprocessing.to_dict(),
        "artefacts": {
            name: {
                "description": ARTEFACTS[name].description,
                "severity_unit": ARTEFACTS[name].severity_unit,
                "severities": ladder,
            }
            for name, ladder in ladders.items()
        },
        "n_per_cohort": sizes,
        "smallest_attainable_p": {str(n): p for n, p in floor.items()},
        "settings": {k: v for k, v in asdict(settings).items() if k != "extra"},
        "encode_seconds": emb.seconds,
        "statistics_seconds": time.perf_counter() - t0,
    }
    return {
        "rows": rows,
        "summary": summary,
        "minimum_detectable": minimum_detectable(summary),
        "embeddings": emb,
        "meta": meta,
    }


def calibration_csv_text(rows: Iterable[Mapping]) -> str:
    """``calibration.csv`` content: :data:`CALIBRATION_COLUMNS`, floats in full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CALIBRATION_COLUMNS)
    for r in rows:
        writer.writerow([_cell(r[c]) for c in CALIBRATION_COLUMNS])
    return buf.getvalue()


def _cell(value) -> str:
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return repr(float(value))
    return str(value)
