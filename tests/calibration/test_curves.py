"""Calibration curves: disjoint halves, the null shared by every artefact, AAD growing with the
shift, detection rates, fraction_affected, determinism; equivalent-severity inversion on
fabricated curves (interpolation, null, above range, invisible artefact, isotonic fit, nearest
cohort size, CSV/JSON round trip, errors); and the embedding of shifted subjects matching
``embed_cohort`` for the clean condition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aad_med.calibration.conditions import embed_conditions
from aad_med.calibration.curves import (
    CALIBRATION_COLUMNS,
    ConditionEmbeddings,
    calibration_rows,
    calibration_summary,
    check_sizes,
    minimum_detectable,
)
from aad_med.calibration.equivalence import (
    _isotonic,
    describe_equivalent_severity,
    equivalent_severity,
    equivalent_severity_details,
)
from aad_med.calibration.table import calibration_csv_text, read_calibration_table
from aad_med.errors import ConfigError, InputError
from aad_med.pipelines.calibrate import CalibrationSettings

N_SUBJECTS = 24
DIM = 6


def fabricated(n: int = N_SUBJECTS, one_hot: bool = False, seed: int = 0) -> ConditionEmbeddings:
    """Clean vectors plus a 'noise' condition shifting every subject by severity along dim 0
    and a 'scale' condition that changes nothing (as z-scoring makes a global gain)."""
    rng = np.random.default_rng(seed)
    clean = np.eye(n) if one_hot else rng.standard_normal((n, DIM))
    conditions = [("none", 0.0)]
    vectors = [clean]
    for s in (0.25, 0.5, 1.0, 3.0):
        shifted = clean.copy()
        shifted[:, 0] += s
        conditions.append(("noise", s))
        vectors.append(shifted)
    for s in (0.5, 1.0):
        conditions.append(("scale", s))
        vectors.append(clean.copy())
    return ConditionEmbeddings([f"S{i}" for i in range(n)], conditions, np.stack(vectors))


LADDERS = {"noise": [0.0, 0.25, 0.5, 1.0, 3.0], "scale": [0.0, 0.5, 1.0]}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return calibration_rows(fabricated(), LADDERS, [4, 12], repeats=20, n_permutations=199)


def test_rows_cover_every_condition_with_the_columns(rows):
    assert len(rows) == 20 * 2 * (5 + 3)
    assert all(tuple(r) == CALIBRATION_COLUMNS for r in rows)
    keys = {(r["artefact"], r["severity"], r["n_per_cohort"], r["repeat"]) for r in rows}
    assert len(keys) == len(rows)
    for r in rows:
        assert 0 < r["aad_p"] <= 1 and r["aad"] >= 0 and r["aad_mahalanobis"] >= 0
        assert r["significant"] == (r["aad_p"] <= 0.05)
        assert r["n_affected"] == (0 if r["severity"] == 0 else r["n_per_cohort"])


def test_null_rows_are_shared_by_every_artefact(rows):
    null = {}
    for r in rows:
        if r["severity"] == 0:
            key = (r["n_per_cohort"], r["repeat"])
            stats = (r["aad"], r["aad_mahalanobis"], r["aad_p"])
            assert null.setdefault(key, stats) == stats


def test_compared_halves_are_disjoint():
    # One-hot subjects: two disjoint cohorts of n have AAD exactly sqrt(2/n); any shared subject
    # would make it smaller.
    rows = calibration_rows(
        fabricated(one_hot=True), {"noise": [0.0, 0.5]}, [3, 6, 12], repeats=10, n_permutations=9
    )
    for r in rows:
        if r["severity"] == 0:
            assert r["aad"] == pytest.approx(np.sqrt(2 / r["n_per_cohort"]), rel=1e-9)


def test_aad_grows_with_severity_and_power_with_n(rows):
    summary = calibration_summary(rows)
    by = {(s["artefact"], s["severity"], s["n_per_cohort"]): s for s in summary}
    for n in (4, 12):
        means = [by[("noise", s, n)]["aad_mean"] for s in LADDERS["noise"]]
        assert all(b > a for a, b in zip(means, means[1:], strict=False)), means
        # A shift of 3 along one axis: AAD ~ 3.
        assert by[("noise", 3.0, n)]["aad_mean"] == pytest.approx(3.0, abs=0.5)
        # No shift: about alpha of the repeats are (falsely) significant.
        assert by[("noise", 0.0, n)]["detection_rate"] <= 0.2
        assert by[("scale", 1.0, n)]["detection_rate"] <= 0.2
        lo, hi = by[("noise", 1.0, n)]["aad_ci95"]
        assert lo <= by[("noise", 1.0, n)]["aad_mean"] <= hi
    # Always detected with 12 per cohort; with 4 the smallest possible p (2 of 70 relabellings
    # are as extreme) sits near alpha, so only part of the repeats reach it.
    assert by[("noise", 3.0, 12)]["detection_rate"] == 1.0
    assert 0.2 <= by[("noise", 3.0, 4)]["detection_rate"] < 1.0
    assert by[("noise", 1.0, 12)]["detection_rate"] > by[("noise", 1.0, 4)]["detection_rate"]
    md = minimum_detectable(summary)
    assert md["noise"]["12"] == 3.0
    assert md["noise"]["4"] is None  # never reaches 80% power with 4 per cohort
    assert md["scale"] == {"4": None, "12": None}


def test_fraction_affected_dilutes_the_shift():
    emb = fabricated()
    full = calibration_rows(emb, {"noise": [0.0, 3.0]}, [12], repeats=10, n_permutations=9)
    half = calibration_rows(
        emb, {"noise": [0.0, 3.0]}, [12], repeats=10, fraction_affected=0.5, n_permutations=9
    )
    assert all(r["n_affected"] == 6 for r in half if r["severity"] > 0)
    aad = {
        name: np.mean([r["aad"] for r in rs if r["severity"] == 3.0])
        for name, rs in (("full", full), ("half", half))
    }
    assert aad["half"] / aad["full"] == pytest.approx(0.5, abs=0.12)


def test_rows_are_deterministic_per_seed():
    emb = fabricated()
    a = calibration_rows(emb, LADDERS, [4], repeats=3, n_permutations=49, seed=5)
    b = calibration_rows(emb, LADDERS, [4], repeats=3, n_permutations=49, seed=5)
    c = calibration_rows(emb, LADDERS, [4], repeats=3, n_permutations=49, seed=6)
    assert a == b and a != c


def test_smallest_attainable_p():
    from aad_med.calibration.curves import smallest_attainable_p

    assert smallest_attainable_p(2) == pytest.approx(2 / 6)
    assert smallest_attainable_p(3) == pytest.approx(0.1)
    assert smallest_attainable_p(4) == pytest.approx(2 / 70)


def test_check_sizes():
    assert check_sizes(None, 40) == [5, 10, 20]
    assert check_sizes(None, 8) == [2, 4]
    assert check_sizes([10, 5, 5], 20) == [5, 10]
    with pytest.raises(ConfigError, match="exceed half of the 20 reference subjects"):
        check_sizes([5, 11], 20)
    with pytest.raises(ConfigError, match="at least 4"):
        check_sizes(None, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"repeats": 0}, "repeats"),
        ({"fraction_affected": 0.0}, "fraction_affected"),
        ({"n_permutations": 0}, "n_permutations"),
        ({"alpha": 1.5}, "alpha"),
        ({"n_per_cohort": [1, 5]}, "n_per_cohort"),
    ],
)
def test_settings_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CalibrationSettings(**kwargs).check()


# ------------------------------------------------------------------ equivalent severity


def curve_rows(n: int, artefact: str, severities, means, repeats: int = 3, jitter=0.0):
    out = []
    for s, m in zip(severities, means, strict=True):
        for r in range(repeats):
            out.append(
                {
                    "artefact": artefact,
                    "severity": s,
                    "n_per_cohort": n,
                    "repeat": r,
                    "aad": m + jitter * (r - (repeats - 1) / 2),
                    "aad_mahalanobis": 2 * m,
                }
            )
    return out


SEV = [0.0, 0.1, 0.2, 0.4]
TABLE = (
    curve_rows(10, "noise", SEV, [0.1 + 2 * s for s in SEV])
    + curve_rows(10, "scale", SEV, [0.1, 0.1, 0.1, 0.1], jitter=0.01)
    + curve_rows(10, "gamma", SEV, [0.1, 0.5, 0.4, 0.9])
    + curve_rows(40, "noise", SEV, [0.05 + 1 * s for s in SEV])
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.5, 0.2), (0.7, 0.3), (0.2, 0.05), (0.1, 0.0), (0.05, 0.0), (0.9, 0.4), (2.0, None)],
)
def test_inverts_a_monotone_curve(value, expected):
    got = equivalent_severity(TABLE, value, n_per_cohort=10)["noise"]
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_flat_curve_is_invisible_and_bumps_are_smoothed():
    got = equivalent_severity(TABLE, 0.3, n_per_cohort=10)
    assert got["scale"] is None
    details = equivalent_severity_details(TABLE, 0.3, n_per_cohort=10)
    assert details["scale"]["status"] == "invisible"
    # 0.5 at 0.1 then 0.4 at 0.2 is pooled to 0.45, 0.45 by the isotonic fit.
    assert details["gamma"]["means"] == pytest.approx([0.1, 0.45, 0.45, 0.9])
    assert got["gamma"] == pytest.approx(0.1 * (0.3 - 0.1) / (0.45 - 0.1))
    assert details["noise"]["status"] == "within"
    above = equivalent_severity_details(TABLE, 5.0, n_per_cohort=10)["noise"]
    assert above["status"] == "above" and above["severity"] is None


def test_nearest_cohort_size_and_statistic():
    # n=40: aad = 0.05 + s, so 0.25 -> 0.2; at n=10 the same value means 0.075.
    assert equivalent_severity(TABLE, 0.25)["noise"] == pytest.approx(0.2)
    assert equivalent_severity(TABLE, 0.25, n_per_cohort=30)["noise"] == pytest.approx(0.2)
    assert equivalent_severity(TABLE, 0.25, n_per_cohort=12)["noise"] == pytest.approx(0.075)
    assert set(equivalent_severity(TABLE, 0.25)) == {"noise"}  # n=40 only has noise
    std = equivalent_severity(TABLE, 1.0, n_per_cohort=10, statistic="aad_mahalanobis")
    assert std["noise"] == pytest.approx(0.2)


def test_isotonic_is_non_decreasing_and_keeps_sorted_input():
    y = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    fit = _isotonic(y)
    assert np.all(np.diff(fit) >= 0) and fit.sum() == pytest.approx(y.sum())
    assert np.array_equal(_isotonic(np.array([1.0, 2.0, 3.0])), [1.0, 2.0, 3.0])


def test_csv_and_json_round_trip(tmp_path, rows):
    csv_path = tmp_path / "calibration.csv"
    csv_path.write_text(calibration_csv_text(rows))
    back = read_calibration_table(csv_path)
    assert len(back) == len(rows) and list(back[0]) == list(CALIBRATION_COLUMNS)
    assert float(back[3]["aad"]) == rows[3]["aad"]
    assert back[0]["significant"] in ("true", "false")
    json_path = tmp_path / "calibration.json"
    json_path.write_text(json.dumps({"rows": rows}))
    value = float(np.mean([r["aad"] for r in rows if r["severity"] == 1.0]))
    from_mem = equivalent_severity(rows, value, 12)
    assert equivalent_severity(csv_path, value, 12) == pytest.approx(from_mem)
    assert equivalent_severity(str(json_path), value, 12) == pytest.approx(from_mem)
    assert from_mem["noise"] == pytest.approx(1.0, abs=0.3) and from_mem["scale"] is None
    columns = {k: [r[k] for r in rows] for k in CALIBRATION_COLUMNS}
    assert equivalent_severity(columns, value, 12) == pytest.approx(from_mem)


def test_describe_equivalent_severity():
    lines = describe_equivalent_severity(TABLE, 0.7, n_per_cohort=10)
    text = "\n".join(lines)
    assert "noise: like severity 0.3 (noise sigma / median brain intensity" in text
    assert "curve at 10 subjects per cohort" in text
    assert "scale: not comparable" in text
    assert "larger than the largest calibrated severity" in "\n".join(
        describe_equivalent_severity(TABLE, 9.0, 10)
    )
    assert "no larger than two clean halves" in "\n".join(
        describe_equivalent_severity(TABLE, 0.01, 10)
    )


def test_table_errors(tmp_path):
    with pytest.raises(InputError, match="missing.csv: cannot read calibration"):
        equivalent_severity(tmp_path / "missing.csv", 0.3)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="bad.csv: not a calibration table"):
        equivalent_severity(bad, 0.3)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{}")
    with pytest.raises(InputError, match="not a calibration.json"):
        equivalent_severity(bad_json, 0.3)
    with pytest.raises(ConfigError, match="lacks column"):
        equivalent_severity({"artefact": ["noise"]}, 0.3)
    with pytest.raises(ConfigError, match="empty"):
        equivalent_severity([], 0.3)


# ------------------------------------------------------------------ embedding shifted subjects


def test_clean_condition_matches_embed_cohort(calib_data):
    from aad_med.data.validation import load_cohort
    from aad_med.embedding import embed_cohort
    from aad_med.training.checkpoint import load_model_from_checkpoint

    model, pre, _ = load_model_from_checkpoint(calib_data["ckpt"])
    cohort = load_cohort(calib_data["reference"])
    subjects = cohort.subjects[:3]
    emb = embed_conditions(
        model,
        subjects,
        pre,
        {"noise": [0.0, 0.1], "blur": [0.0, 2.0]},
        features="latent",
        progress=False,
    )
    assert emb.conditions == [("none", 0.0), ("noise", 0.1), ("blur", 2.0)]
    assert emb.vectors.shape == (3, 3, 8) and emb.subject_ids == cohort.subject_ids[:3]
    cohort.subjects = subjects
    ref = embed_cohort(model, cohort, pre, features="latent", progress=False)
    np.testing.assert_allclose(emb.vectors[0], ref.vectors, rtol=1e-5, atol=1e-6)
    for i in (1, 2):
        assert np.abs(emb.vectors[i] - emb.vectors[0]).max() > 1e-4
    assert emb.index("blur", 2.0) == 2 and emb.index("noise", 0.0) == 0
    with pytest.raises(KeyError):
        emb.index("noise", 0.2)
    # Deterministic: the same subjects give the same shifted vectors.
    again = embed_conditions(
        model, subjects[:1], pre, {"noise": [0.1]}, features="latent", progress=False
    )
    np.testing.assert_allclose(again.vectors[1, 0], emb.vectors[1, 0], rtol=1e-6)


def test_annotate_pairs_for_the_report(tmp_path):
    from aad_med.calibration import annotate_pairs
    from aad_med.calibration.equivalence import equivalent_n

    assert equivalent_n(10, 10) == 10 and equivalent_n(5, 20) == pytest.approx(8.0)
    pairs = [{"a": "site_a", "b": "site_b", "aad": 0.7, "n_a": 12, "n_b": 9}]
    (entry,) = annotate_pairs(TABLE, pairs)
    assert entry["n_per_cohort"] == pytest.approx(2 * 12 * 9 / 21)
    assert entry["equivalent_severity"]["noise"] == pytest.approx(0.3)  # curve at n=10
    assert entry["statements"][0].startswith("noise: like severity 0.3")
    assert entry["warning"] is None
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"checkpoint_sha256": "abc", "rows": TABLE}))
    assert annotate_pairs(path, pairs, checkpoint_sha256="abc")[0]["warning"] is None
    other = annotate_pairs(path, pairs, checkpoint_sha256="def")[0]
    assert "made with another checkpoint" in other["warning"]
    assert other["equivalent_severity"] == entry["equivalent_severity"]


def test_a_table_written_before_the_rename_reads_under_the_new_column(tmp_path, rows):
    old = calibration_csv_text(rows).replace("aad_mahalanobis", "aad_standardized", 1)
    path = tmp_path / "calibration.csv"
    path.write_text(old)
    back = read_calibration_table(path)
    assert "aad_standardized" not in back[0]
    assert [float(r["aad_mahalanobis"]) for r in back] == [r["aad_mahalanobis"] for r in rows]
    value = float(np.mean([r["aad_mahalanobis"] for r in rows if r["severity"] == 1.0]))
    assert equivalent_severity(path, value, 12, statistic="aad_mahalanobis") == pytest.approx(
        equivalent_severity(rows, value, 12, statistic="aad_mahalanobis")
    )
