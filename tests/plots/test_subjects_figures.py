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


def test_a_thumbnail_sheet_redrawn_gives_the_fresh_figures_pixels(tmp_path):
    """ThumbnailSheet reuses one figure: each subject's PNG is pixel for pixel the one a fresh
    figure draws (images, grey ranges and titles replaced), another grid size included."""
    from PIL import Image

    from aad_med.plots.subjects import ThumbnailSheet

    generate_cohort(tmp_path / "c", 2, "reference", seed=0, shape=(32, 36, 28), id_prefix="T_")
    generate_cohort(tmp_path / "d", 1, "reference", seed=1, shape=(30, 34, 26), id_prefix="U_")
    recs = [*load_cohort(tmp_path / "c").subjects, *load_cohort(tmp_path / "d").subjects]
    with ThumbnailSheet() as sheet:
        for i, rec in enumerate(recs):
            sheet.draw(rec, tmp_path / f"sheet{i}.png", title=f"x / {rec.subject_id}")
    for i, rec in enumerate(recs):
        plot_thumbnails(rec, tmp_path / f"fresh{i}.png", title=f"x / {rec.subject_id}")
        a = np.asarray(Image.open(tmp_path / f"sheet{i}.png"))
        b = np.asarray(Image.open(tmp_path / f"fresh{i}.png"))
        assert a.shape == b.shape and np.array_equal(a, b), rec.subject_id
