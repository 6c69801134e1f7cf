"""Figures of the per-subject step (``aad_med.plots.subjects``) write valid PNGs from fabricated
inputs: IQMs per cohort, a subject's channel thumbnails, and the drift of batches."""

from __future__ import annotations

import numpy as np
from test_figures import assert_png

from aad_med import CHANNELS
from aad_med.data.quality import METRICS
from aad_med.data.synthetic import generate_cohort
from aad_med.data.validation import load_cohort
from aad_med.plots.subjects import plot_drift, plot_quality, plot_thumbnails


def test_quality_plot_with_undefined_columns(tmp_path):
    columns = [f"{ch}_{m}" for ch in CHANNELS for m in METRICS]
    rng = np.random.default_rng(0)
    values = {"a": rng.normal(5, 1, (6, len(columns))), "b": rng.normal(7, 1, (4, len(columns)))}
    values["b"][:, columns.index("t1_cnr")] = np.nan  # a metric undefined for a whole cohort
    assert_png(plot_quality(columns, values, tmp_path / "q.png"))


def test_thumbnails_and_drift(tmp_path):
    generate_cohort(tmp_path / "c", 1, "reference", seed=0, shape=(32, 36, 28), id_prefix="T_")
    rec = load_cohort(tmp_path / "c").subjects[0]
    assert_png(plot_thumbnails(rec, tmp_path / "t.png", title="c / T_00000"), min_side=80)
    points = [
        {"batch": f"b{i}", "aad": 1.0 + i, "aad_ci95": [0.5 + i, 1.5 + i], "aad_p": 0.5 / (i + 1)}
        for i in range(3)
    ]
    assert_png(plot_drift(points, "ref", tmp_path / "d.png"))
