"""aad-compare's caches and phase timings: a second comparison with another checkpoint reads the
preprocessed subjects instead of decoding, and gives what a comparison without caches gives;
``cache=read`` writes nothing, ``cache=off`` touches no cache; distances.json records the seconds
of each phase."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aad_med.data import io as data_io
from aad_med.pipelines.compare import CompareSettings, run_comparison
from tests.checkpoint_factory import write_tiny_checkpoint
from tests.nifti_factory import write_brats_cohort

FAST = dict(
    n_permutations=49,
    n_bootstrap=20,
    bands_bootstrap=20,
    regional=False,
    decode_means=False,
    device="cpu",
    progress=False,
    # The data path alone; the per-subject step (quality metrics, thumbnails) has its own test
    # below (test_thumbnails_read_no_file_in_a_first_or_a_second_comparison).
    subjects=False,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmpcache")
    cohorts = {
        "a": str(write_brats_cohort(root / "a", n=3)),
        "b": str(write_brats_cohort(root / "b", n=3, scale=1.4)),
    }
    ckpts = [write_tiny_checkpoint(root / f"ckpt{i}.pt", seed=i) for i in range(2)]
    return root, cohorts, ckpts


def count_decodes(monkeypatch) -> list:
    """Every volume decoded, by embedding (``data.io``) or by validation."""
    from aad_med.data import validation

    calls = []
    real = data_io.read_stored
    spy = lambda *a: calls.append(a[1]) or real(*a)  # noqa: E731
    monkeypatch.setattr(data_io, "read_stored", spy)
    monkeypatch.setattr(validation, "read_stored", spy)
    return calls


def test_second_checkpoint_skips_decoding_and_equals_an_uncached_run(setup, tmp_path, monkeypatch):
    _, cohorts, (first_ckpt, second_ckpt) = setup
    cached = CompareSettings(**FAST, cache_dir=tmp_path / "emb", preprocessed_dir=tmp_path / "pre")
    decodes = count_decodes(monkeypatch)
    first = run_comparison(first_ckpt, cohorts, tmp_path / "run1", cached)
    # Validation reads headers; the embedding decodes the 6 subjects' 5 files once, checking
    # their voxels (the seg too), and the fingerprint reuses those arrays.
    assert len(decodes) == 6 * 5
    # Validation checked headers only (the embedding checked the voxels): header markers.
    markers = sorted(p.name.split("-ok-")[0] for p in (tmp_path / "emb" / "checked").iterdir())
    assert markers == ["headers"] * 6
    assert len(list((tmp_path / "pre").glob("*.npys"))) == 6
    seconds = first["timings"]["seconds"]
    for phase in ("decode", "preprocessing", "fingerprint", "forward", "features", "statistics"):
        assert seconds[phase] > 0, phase
    assert {"embedding", "intensity", "figures_report"} <= set(seconds)
    assert first["timings"]["total"] >= seconds["embedding"]
    on_disk = json.loads((tmp_path / "run1" / "distances.json").read_text())
    assert on_disk["timings"] == first["timings"]

    decodes.clear()
    from aad_med.data import validation

    headers = []
    real_header = validation.read_header
    monkeypatch.setattr(validation, "read_header", lambda *a: headers.append(a) or real_header(*a))
    second = run_comparison(second_ckpt, cohorts, tmp_path / "run2", cached)
    assert decodes == []  # neither validation nor embedding decodes a volume again
    assert headers == []  # unchanged files that passed the same checks: not read again
    assert "decode" not in second["timings"]["seconds"]
    assert second["timings"]["seconds"]["cache_read"] > 0

    off = CompareSettings(**FAST, cache="off", preprocessed_dir=tmp_path / "never")
    uncached = run_comparison(second_ckpt, cohorts, tmp_path / "run3", off)
    assert not (tmp_path / "never").exists()
    for key in ("pairs", "pairwise_aad", "intensity"):
        assert second[key] == uncached[key], key
    for run in ("run2", "run3"):
        assert (tmp_path / run / "intensity_fingerprint.csv").is_file()
    a = (tmp_path / "run2" / "embeddings.csv").read_bytes()
    assert a == (tmp_path / "run3" / "embeddings.csv").read_bytes()


def test_read_mode_writes_no_cache_entry(setup, tmp_path):
    _, cohorts, (ckpt, _) = setup
    s = CompareSettings(
        **FAST, cache="read", cache_dir=tmp_path / "emb", preprocessed_dir=tmp_path / "pre"
    )
    result = run_comparison(ckpt, cohorts, tmp_path / "run", s)
    assert np.isfinite(result["pairs"][0]["aad"])
    assert not list(tmp_path.glob("emb/*")) and not list(tmp_path.glob("pre/*"))


def test_per_subject_step_reads_each_file_once_and_its_metrics_equal_a_fresh_read(
    setup, tmp_path, monkeypatch
):
    """With the per-subject step on, the embedding decodes every file (the seg too) once,
    computing the image-quality metrics from those arrays; a
    second comparison with another checkpoint decodes nothing and reads the same metrics from
    the preprocessed cache. The values equal the per-subject step reading the files itself."""
    import csv

    from aad_med.data.layouts import discover_cohort
    from aad_med.pipelines.subjects import subject_quality_table

    _, cohorts, (first_ckpt, second_ckpt) = setup
    s = CompareSettings(
        **{**FAST, "subjects": True}, cache_dir=tmp_path / "emb", preprocessed_dir=tmp_path / "pre"
    )
    decodes = count_decodes(monkeypatch)
    # Thumbnails read one slice of a few subjects' files (data.io.read_mid_slice), no volume.
    first = run_comparison(first_ckpt, cohorts, tmp_path / "run1", s)
    assert sorted(map(str, decodes)) == sorted(
        str(f) for c in cohorts.values() for r in discover_cohort(c).subjects for f in r.files
    )
    assert len(decodes) == 6 * 5
    assert first["timings"]["seconds"]["quality"] > 0
    decodes.clear()
    run_comparison(second_ckpt, cohorts, tmp_path / "run2", s)
    assert decodes == []

    def table(run):
        with open(tmp_path / run / "subjects.csv", newline="") as f:
            return list(csv.DictReader(f))

    columns, expected = subject_quality_table(discover_cohort(cohorts["b"]).subjects)
    for run in ("run1", "run2"):
        rows = [r for r in table(run) if r["cohort"] == "b"]
        got = np.array([[float(r[c]) if r[c] else np.nan for c in columns] for r in rows])
        np.testing.assert_array_equal(got, expected)


def test_thumbnails_read_no_file_in_a_first_or_a_second_comparison(setup, tmp_path, monkeypatch):
    """The per-subject step's thumbnails take the middle slices the embedding's decode kept (a
    first comparison) or the preprocessed cache's entries hold (a second one, in a new process:
    the memo emptied), so each file is decoded once in all and the second run opens none."""
    from aad_med.data.io import MID_SLICES

    _, cohorts, (first_ckpt, second_ckpt) = setup
    settings = CompareSettings(
        **{**FAST, "subjects": True},
        cache_dir=tmp_path / "emb",
        preprocessed_dir=tmp_path / "pre",
    )
    decodes = count_decodes(monkeypatch)
    misses, calls = [], []
    real = data_io.read_mid_slice

    def spy(source, *a, **k):
        calls.append(source.path)
        if MID_SLICES.get(source) is None:  # not kept: read_mid_slice opens the file
            misses.append(source.path)
        return real(source, *a, **k)

    monkeypatch.setattr(data_io, "read_mid_slice", spy)
    MID_SLICES.clear()
    run_comparison(first_ckpt, cohorts, tmp_path / "run1", settings)
    assert calls, "the report drew no thumbnail"
    assert misses == []
    assert len(decodes) == 6 * 5  # four channels and the seg of 6 subjects, once each

    MID_SLICES.clear()  # what a new process starts with
    calls.clear()
    decodes.clear()
    second = run_comparison(second_ckpt, cohorts, tmp_path / "run2", settings)
    assert calls and misses == [] and decodes == []
    assert second["timings"]["seconds"]["cache_read"] > 0
    MID_SLICES.clear()
