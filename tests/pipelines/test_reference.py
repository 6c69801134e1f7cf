"""A reference fitted once (``aad_med.pipelines.reference``): ``aad-compare reference=REF`` gives
the same statistics and subject table as encoding both cohorts, several batches get a drift
section, and a reference file that is truncated, of another format or aad-med version, of another
checkpoint or preprocessing, or tampered with is refused with one line naming the file before
anything is written."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from checkpoint_factory import write_tiny_checkpoint

from aad_med import DEFAULT_FEATURES
from aad_med.data.synthetic import generate_cohort
from aad_med.errors import CheckpointError, ConfigError, InputError
from aad_med.pipelines.compare import CompareSettings, run_comparison
from aad_med.pipelines.reference import (
    ReferenceSettings,
    fit_reference,
    load_reference,
    meta_sha256,
    reference_paths,
)

SHAPE = (32, 36, 28)
STATS = ("aad", "aad_p", "aad_ci95", "aad_unbiased", "energy", "mmd2", "intensity_p")


def settings(**kw) -> CompareSettings:
    return CompareSettings(n_permutations=99, n_bootstrap=50, cache=False, progress=False, **kw)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    generate_cohort(root / "site", 8, "reference", seed=3, shape=SHAPE, id_prefix="R_")
    generate_cohort(root / "batch1", 6, "reference", seed=4, shape=SHAPE, id_prefix="B1_")
    noisy = "site_b"  # another scanner: the drift plot's second batch
    generate_cohort(root / "batch2", 6, noisy, seed=5, shape=SHAPE, id_prefix="B2_")
    ckpt = write_tiny_checkpoint(root / "ckpt.pt")
    ref = fit_reference(
        ckpt,
        root / "site",
        root / "ref",
        ReferenceSettings(name="site", cache=False, progress=False),
    )
    return {"root": root, "ckpt": ckpt, "ref": ref}


def test_fit_writes_pair_without_pickle(fitted):
    json_path, npz_path = reference_paths(fitted["root"] / "ref")
    assert fitted["ref"].path == json_path and npz_path.is_file()
    meta = json.loads(json_path.read_text())
    assert meta["format"] == "aad-med-reference" and meta["format_version"] == 1
    assert meta["subject_ids"] == [f"R_{i:05d}" for i in range(8)]
    assert meta["features"] == DEFAULT_FEATURES
    assert [b[0] for b in meta["feature_blocks"]] == DEFAULT_FEATURES.split("+")
    assert meta["npz_sha256"] == hashlib.sha256(npz_path.read_bytes()).hexdigest()
    with np.load(npz_path, allow_pickle=False) as npz:
        assert set(npz.files) == {"vectors", "latent_means", "n_patches", "fingerprint", "quality"}
        assert all(npz[k].dtype != object for k in npz.files)
        assert npz["quality"].shape == (8, len(meta["quality_columns"]))
    loaded = load_reference(json_path.with_suffix(""))  # REF, REF.json and REF.npz all work
    np.testing.assert_array_equal(loaded.arrays["vectors"], fitted["ref"].arrays["vectors"])
    with pytest.raises(ConfigError, match="already exists"):
        fit_reference(fitted["ckpt"], fitted["root"] / "site", npz_path, ReferenceSettings())


@pytest.mark.slow
def test_stored_reference_equals_encoding_both(fitted, tmp_path):
    r = fitted["root"]
    both = run_comparison(
        fitted["ckpt"],
        {"site": r / "site", "batch1": r / "batch1", "batch2": r / "batch2"},
        tmp_path / "both",
        settings(),
    )
    stored = run_comparison(
        fitted["ckpt"],
        {"batch1": r / "batch1", "batch2": r / "batch2"},
        tmp_path / "stored",
        settings(reference=str(fitted["ref"].path)),
    )
    assert [(p["a"], p["b"]) for p in stored["pairs"]] == [(p["a"], p["b"]) for p in both["pairs"]]
    for pa, pb in zip(both["pairs"], stored["pairs"], strict=True):
        for key in STATS:
            np.testing.assert_allclose(pb[key], pa[key], rtol=1e-9, atol=1e-12)
    a = (tmp_path / "both" / "subjects.csv").read_text().splitlines()
    b = (tmp_path / "stored" / "subjects.csv").read_text().splitlines()
    assert a[0] == b[0] and len(a) == 1 + 8 + 6 + 6
    for la, lb in zip(a[1:], b[1:], strict=True):
        for va, vb in zip(la.split(","), lb.split(","), strict=True):
            try:
                assert float(vb) == pytest.approx(float(va), rel=1e-9, abs=1e-12)
            except ValueError:
                assert va == vb  # names, roles, drivers, empty cells
    info = stored["cohorts"]["site"]
    assert info["path"] == str((r / "site").resolve()) and info["n_subjects"] == 8
    # Several batches against a stored reference: the drift section, batches in order.
    drift = stored["drift"]
    assert [pt["batch"] for pt in drift["batches"]] == ["batch1", "batch2"]
    assert (tmp_path / "stored" / drift["png"]).stat().st_size > 1000
    assert "## Drift against the reference" in (tmp_path / "stored" / "report.md").read_text()
    assert "drift" not in both


def _copy(fitted, tmp_path) -> tuple[Path, Path]:
    json_path, npz_path = reference_paths(fitted["ref"].path)
    dst = tmp_path / "copy.json"
    shutil.copy(json_path, dst)
    shutil.copy(npz_path, tmp_path / "copy.npz")
    return dst, tmp_path / "copy.npz"


def _rewrite_meta(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    meta["meta_sha256"] = meta_sha256(meta)
    path.write_text(json.dumps(meta))


def _bad(kind: str, fitted, tmp_path) -> tuple[Path, str]:
    """A broken copy of the reference and the file its error must name."""
    js, npz = _copy(fitted, tmp_path)
    if kind == "truncated_json":
        js.write_bytes(js.read_bytes()[: js.stat().st_size // 2])
    elif kind == "truncated_npz":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
        return js, npz.name
    elif kind == "format_version":
        _rewrite_meta(js, format_version=2)
    elif kind == "major_version":
        _rewrite_meta(js, aad_med_version="9.0.0")
    elif kind == "edited_json":
        meta = json.loads(js.read_text())
        meta["preprocessing"]["patch_size"] = 16
        js.write_text(json.dumps(meta))
    elif kind == "tampered_array":
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        arrays["vectors"] = arrays["vectors"] + 1.0
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        npz.write_bytes(buf.getvalue())
        _rewrite_meta(js, npz_sha256=hashlib.sha256(buf.getvalue()).hexdigest())
        return js, npz.name
    elif kind == "missing_npz":
        npz.unlink()
        return js, npz.name
    elif kind == "not_reference":
        js.write_text(json.dumps({"format": "something-else"}))
    return js, js.name


BAD = {
    "truncated_json": "truncated or not JSON",
    "truncated_npz": "SHA-256 differs",
    "format_version": "format version 2",
    "major_version": "another major version",
    "edited_json": "edited after aad-reference fit",
    "tampered_array": "array 'vectors' differs",
    "missing_npz": "reference arrays missing",
    "not_reference": "not an aad-med reference file",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_reference_refused_before_anything_is_written(kind, fitted, tmp_path):
    bad, named = _bad(kind, fitted, tmp_path)
    out = tmp_path / "run"
    r = fitted["root"]
    with pytest.raises(InputError) as err:
        run_comparison(fitted["ckpt"], {"new": r / "batch1"}, out, settings(reference=str(bad)))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and named in message and BAD[kind] in message
    assert not out.exists()


def test_other_checkpoint_or_preprocessing_refused(fitted, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    out = tmp_path / "run"
    with pytest.raises(
        CheckpointError, match=r"ref\.json: reference fitted with another checkpoint"
    ):
        run_comparison(
            other,
            {"new": fitted["root"] / "batch1"},
            out,
            settings(reference=str(fitted["ref"].path)),
        )
    assert not out.exists()
    ref = load_reference(fitted["ref"].path)
    changed = dict(ref.meta["preprocessing"], patch_size=16)
    with pytest.raises(InputError, match=r"ref\.json: reference fitted with other preprocessing"):
        ref.check_preprocessing(changed)
    ref.check_preprocessing(ref.meta["preprocessing"])  # the fit's own: accepted
    with pytest.raises(ConfigError, match="embedding.features=multiscale"):
        run_comparison(
            fitted["ckpt"],
            {"new": fitted["root"] / "batch1"},
            out,
            settings(reference=str(fitted["ref"].path), features="latent"),
        )
    with pytest.raises(ConfigError, match="stored reference's"):
        run_comparison(
            fitted["ckpt"],
            {"site": fitted["root"] / "batch1"},
            out,
            settings(reference=str(fitted["ref"].path)),
        )
    assert not out.exists()
