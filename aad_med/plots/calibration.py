"""Figures of the shift calibration (``aad-calibrate``): AAD against artefact severity, and the
detection rate (power) against cohort size. Computes no statistics: it draws the summary of
:func:`aad_med.calibration.curves.calibration_summary`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from aad_med.plots.style import OKABE_ITO, new_figure, save_figure


def _by_artefact(summary: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = defaultdict(list)
    for s in summary:
        groups[str(s["artefact"])].append(s)
    return dict(groups)


def _grid(n_panels: int, width: float = 4.0, height: float = 3.2):
    cols = min(3, max(1, n_panels))
    rows = int(np.ceil(max(1, n_panels) / cols))
    fig = new_figure(width * cols, height * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def plot_calibration_curves(
    summary: Iterable[Mapping],
    path: str | Path,
    units: Mapping[str, str] | None = None,
    statistic: str = "aad",
) -> Path:
    """One panel per artefact: mean AAD against severity, one line per cohort size, with the
    2.5-97.5 percentile band over repeats. Severity 0 is two clean halves (the null level).

    Args:
        summary: rows of ``calibration_summary`` (``artefact, severity, n_per_cohort,
            aad_mean, aad_ci95`` and the ``aad_mahalanobis_*`` twins).
        path: output PNG.
        units: severity unit per artefact (axis labels).
        statistic: ``"aad"`` or ``"aad_mahalanobis"``.
    """
    groups = _by_artefact(summary)
    fig, axes = _grid(len(groups))
    sizes = sorted({int(s["n_per_cohort"]) for g in groups.values() for s in g})
    colors = {n: OKABE_ITO[i % len(OKABE_ITO)] for i, n in enumerate(sizes)}
    for ax, (artefact, rows) in zip(axes, groups.items(), strict=False):
        for n in sizes:
            pts = sorted(
                (s for s in rows if int(s["n_per_cohort"]) == n), key=lambda s: s["severity"]
            )
            if not pts:
                continue
            x = np.array([float(s["severity"]) for s in pts])
            y = np.array([float(s[f"{statistic}_mean"]) for s in pts])
            band = np.array([s[f"{statistic}_ci95"] for s in pts], dtype=np.float64)
            ax.fill_between(x, band[:, 0], band[:, 1], color=colors[n], alpha=0.18, lw=0)
            ax.plot(x, y, "o-", color=colors[n], lw=1.8, ms=4, label=f"n = {n} per cohort")
        ax.set_title(artefact, fontsize=10)
        unit = (units or {}).get(artefact, "severity")
        ax.set_xlabel(f"severity ({unit})" if unit != "severity" else "severity", fontsize=8)
        ax.set_ylabel("AAD" if statistic == "aad" else "Mahalanobis distance of the means")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        "AAD of clean vs shifted halves of the reference (mean, 95% band over repeats; "
        "severity 0 = no shift)",
        fontsize=10,
    )
    return save_figure(fig, path)


def plot_power(summary: Iterable[Mapping], path: str | Path, alpha: float = 0.05) -> Path:
    """One panel per artefact: share of repeats with ``p <= alpha`` against subjects per cohort,
    one line per severity; severity 0 (grey) is the false-positive rate, which should stay near
    ``alpha``."""
    groups = _by_artefact(summary)
    fig, axes = _grid(len(groups))
    for ax, (artefact, rows) in zip(axes, groups.items(), strict=False):
        severities = sorted({float(s["severity"]) for s in rows})
        positive = [s for s in severities if s > 0]
        for sev in severities:
            pts = sorted(
                (s for s in rows if float(s["severity"]) == sev), key=lambda s: s["n_per_cohort"]
            )
            x = [int(s["n_per_cohort"]) for s in pts]
            y = [float(s["detection_rate"]) for s in pts]
            if sev == 0:
                ax.plot(x, y, "s--", color="0.55", lw=1.2, ms=4, label="0 (no shift)")
            else:
                color = OKABE_ITO[positive.index(sev) % len(OKABE_ITO)]
                ax.plot(x, y, "o-", color=color, lw=1.8, ms=4, label=f"{sev:g}")
        ax.axhline(alpha, color="0.3", lw=0.8, ls=":")
        ax.axhline(0.8, color=OKABE_ITO[3], lw=0.8, ls=":")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xscale("log")
        sizes = sorted({int(s["n_per_cohort"]) for s in rows})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_title(artefact, fontsize=10)
        ax.set_xlabel("subjects per cohort")
        ax.set_ylabel(f"detection rate (p ≤ {alpha:g})")
        ax.grid(alpha=0.3)
        ax.legend(title="severity", fontsize=7, title_fontsize=7)
    fig.suptitle(
        f"Power: share of repeats where the shift is detected at α = {alpha:g} (dotted: α and 80%)",
        fontsize=10,
    )
    return save_figure(fig, path)
