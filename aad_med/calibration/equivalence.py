"""Stage 7, calibration: which artefact severity an observed AAD is as large as.

:func:`equivalent_severity` inverts the mean AAD-vs-severity curve of each artefact (made
monotone by isotonic regression) at the cohort size nearest the comparison's;
:func:`annotate_pairs` does it for every pair of an ``aad-compare`` result. AAD values depend on
the encoder: a calibration is valid only for the checkpoint it was made with (recorded in
``calibration.json``), and its AAD scale is the one of ``aad-compare`` with the same checkpoint
and feature set.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from aad_med.calibration.table import read_calibration_table
from aad_med.data.artefacts import ARTEFACTS
from aad_med.errors import ConfigError, InputError

log = logging.getLogger("aad_med.calibrate")


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
        statistic: ``"aad"`` or ``"aad_mahalanobis"``.

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


def _calibration_record(path: Path) -> dict:
    """What a ``calibration.json`` says it was made with (``features``, ``checkpoint_sha256``);
    empty for a ``calibration.csv``, which records neither."""
    if path.suffix.lower() != ".json":
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read calibration ({e})") from None
    settings = doc.get("settings") if isinstance(doc, Mapping) else None
    return {
        "features": (settings or {}).get("features"),
        "checkpoint_sha256": doc.get("checkpoint_sha256"),
        "scale": doc.get("scale"),
    }


def add_equivalent_severity(result: dict, calibration: str | Path) -> None:
    """Translate every pair's AAD into equivalent artefact severities of a calibration.

    Uses :func:`aad_med.calibration.annotate_pairs` on the AAD of the features the calibration
    was made with: the comparison's own AAD, or the seed's latent AAD when the calibration was
    made with ``latent`` and the comparison with other features. Adds ``equivalent_severity`` to
    each pair (``statistic``, ``features``, ``value``, ``n_per_cohort``, ``severity`` per
    artefact, ``statements``, ``warnings``) and ``calibration`` to ``result``.

    Warnings (one line each): another checkpoint (from ``annotate_pairs``), another feature set,
    a ``calibration.csv`` that records neither, and standardised features, whose AAD is scaled
    by the subjects standardised together (the compared cohorts here, every subject under every
    artefact in the calibration), so the equivalence is approximate; not when both use the
    checkpoint's fixed scale (``scale`` ``"checkpoint"`` in both files).

    Raises:
        InputError: the file is not a calibration table.
    """
    path = Path(calibration)
    made = _calibration_record(path)
    features = str(result["features"])
    cal_features = made.get("features")
    pairs = result["pairs"]
    use_latent = (
        cal_features == "latent"
        and features != "latent"
        and all(p.get("latent_aad") is not None for p in pairs)
    )
    statistic = "latent_aad" if use_latent else "aad"
    measured = "latent" if use_latent else features
    notes = annotate_pairs(
        path,
        [
            {"a": p["a"], "b": p["b"], "n_a": p["n_a"], "n_b": p["n_b"], "aad": p[statistic]}
            for p in pairs
        ],
        checkpoint_sha256=result.get("checkpoint_sha256"),
    )
    extra = []
    if cal_features is None:
        extra.append(
            f"{path}: this calibration records neither the checkpoint nor the features it was "
            f"made with; the equivalences hold only for this checkpoint with "
            f"embedding.features={measured}"
        )
    elif cal_features != measured:
        extra.append(
            f"{path}: calibration was made with features {cal_features}, this comparison uses "
            f"{features}; AAD scales of different feature sets are not comparable"
        )
    # Both on the checkpoint's fixed scale (same checkpoint: annotate_pairs warns otherwise):
    # the AAD of a pair and of a calibrated shift are read on one scale.
    fixed = (
        made.get("scale") == "checkpoint" and result.get("scale") == "checkpoint" and not use_latent
    )
    if measured != "latent" and cal_features in (None, measured) and not fixed:
        extra.append(
            f"{measured} features are standardised over the subjects compared together (here "
            "the compared cohorts, in the calibration every reference subject under every "
            "artefact), so the two AAD scales differ: read the equivalence as approximate"
        )
    by_pair = {(n["a"], n["b"]): n for n in notes}
    for pair in pairs:
        note = by_pair[(pair["a"], pair["b"])]
        pair["equivalent_severity"] = {
            "statistic": statistic,
            "features": measured,
            "value": note["aad"],
            "n_per_cohort": note["n_per_cohort"],
            "severity": note["equivalent_severity"],
            "statements": note["statements"],
            "warnings": [w for w in (note["warning"], *extra) if w],
        }
    result["calibration"] = {
        "path": str(path.resolve()),
        "features": cal_features,
        "checkpoint_sha256": made.get("checkpoint_sha256"),
        "statistic": statistic,
    }
