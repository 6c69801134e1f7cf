"""Real-scan cohorts (issue 5, item 3): BraTS-layout cohorts built from the real scans shipped in
installed packages (nilearn's MNI152 T1 with its GM/WM maps, nibabel's anatomical.nii), and the
validation of AAD on them with a tiny encoder: split halves of one source are not significantly
different, two sources are, and a graded Rician-noise ladder on the real scans gives increasing
AAD. Skipped with a reason when the packages' data are absent."""

from __future__ import annotations

import zlib

import nibabel as nib
import numpy as np
import pytest

from aad_med import CHANNELS
from aad_med.data.real_scans import (
    available_real_sources,
    make_real_subject,
    read_metaimage,
    real_template,
    write_real_cohort,
)
from aad_med.data.validation import load_cohort
from aad_med.errors import ConfigError, InputError

SOURCES = available_real_sources()
NEEDED = ("mni152", "nibabel_anatomical")
needs_sources = pytest.mark.skipif(
    any(s not in SOURCES for s in NEEDED),
    reason="nilearn's MNI152 template or nibabel's anatomical.nii is not installed "
    f"(found: {', '.join(SOURCES) or 'none'})",
)
SIZE = 40


def test_available_sources_are_existing_files():
    for name, path in SOURCES.items():
        assert path.is_file(), name
    if "mni152" in SOURCES:
        folder = SOURCES["mni152"].parent
        assert (folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").is_file()


@needs_sources
@pytest.mark.parametrize("source", NEEDED)
def test_template_channels_and_contrasts(source):
    t = real_template(source, SIZE)
    assert max(t.shape) == SIZE and min(t.shape) >= 16
    assert t.brain.mean() > 0.3
    for ch in CHANNELS:
        v = t.channels[ch]
        assert v.shape == t.shape and v.dtype == np.float32
        assert np.all(v[~t.brain] == 0) and np.all(v[t.brain] > 0)
    # Tissue contrasts of real anatomy: where T1 is darkest (CSF) T2 is brightest, FLAIR is not.
    t1, t2, flair = (t.channels[c][t.brain] for c in ("t1", "t2", "flair"))
    dark, bright = t1 < np.percentile(t1, 10), t1 > np.percentile(t1, 90)
    assert t2[dark].mean() > t2[bright].mean()
    assert flair[dark].mean() < flair[bright].mean() * 1.2
    assert np.corrcoef(t1, t2)[0, 1] < 0.5
    assert real_template(source, SIZE) is t  # prepared once


@needs_sources
def test_cohort_layout_determinism_and_variability(tmp_path):
    a = write_real_cohort(tmp_path / "a", "mni152", 3, seed=4, size=SIZE)
    b = write_real_cohort(tmp_path / "b", "mni152", 3, seed=4, size=SIZE)
    cohort = load_cohort(a)
    assert cohort.layout == "brats2021" and len(cohort.subjects) == 3
    assert cohort.subject_ids == [f"Real_mni152_s4_{i:05d}" for i in range(3)]
    assert all(s.seg is None and set(s.images) == set(CHANNELS) for s in cohort.subjects)
    sid = cohort.subject_ids[0]
    fa, fb = (d / sid / f"{sid}_t2.nii.gz" for d in (a, b))
    assert fa.read_bytes() == fb.read_bytes()
    vols = [np.asarray(nib.load(str(a / s / f"{s}_t1.nii.gz")).dataobj) for s in cohort.subject_ids]
    assert not np.allclose(vols[0], vols[1])
    img = nib.load(str(fa))
    assert np.allclose(img.header.get_zooms(), 1.0) and max(img.shape) == SIZE
    info = (a / "real_scans.json").read_text()
    assert '"physical_spacing_mm"' in info and "mni152" in info
    # Another seed gives other subjects; start_index extends the cohort.
    write_real_cohort(a, "mni152", 1, seed=4, size=SIZE, start_index=3)
    assert len(load_cohort(a).subjects) == 4


@needs_sources
def test_subject_variability_is_controlled():
    t = real_template("nibabel_anatomical", SIZE)
    clean = make_real_subject(t, 0, deformation=0, bias=0, noise=0)
    np.testing.assert_allclose(clean["t1"][t.brain], t.channels["t1"][t.brain], rtol=1e-5)
    noisy = make_real_subject(t, 0, deformation=0, bias=0, noise=0.1)
    resid = (noisy["t1"] - clean["t1"])[t.brain]
    assert 0.05 < resid.std() / np.median(clean["t1"][t.brain]) < 0.15


def test_errors():
    with pytest.raises(ConfigError, match="unknown real scan source 'nope'; available here"):
        real_template("nope")
    with pytest.raises(ConfigError, match="size must be >= 16"):
        real_template("nope", size=8)


def _write_mha(path, vol: np.ndarray, compressed: bool = False, detached: bool = False):
    data = np.ascontiguousarray(vol.transpose()).astype("<i2").tobytes()
    if compressed:
        data = zlib.compress(data)
    header = [
        "ObjectType = Image",
        "NDims = 3",
        f"DimSize = {' '.join(str(s) for s in vol.shape)}",
        "ElementType = MET_SHORT",
        "ElementSpacing = 1.5 1.5 2",
        "BinaryDataByteOrderMSB = False",
        f"CompressedData = {'True' if compressed else 'False'}",
    ]
    if detached:
        (path.parent / "vol.raw").write_bytes(data)
        path.write_text("\n".join([*header, "ElementDataFile = vol.raw"]) + "\n")
    else:
        path.write_bytes(("\n".join([*header, "ElementDataFile = LOCAL"]) + "\n").encode() + data)


@pytest.mark.parametrize(
    ("name", "compressed", "detached"),
    [("a.mha", False, False), ("b.mha", True, False), ("c.mhd", False, True)],
)
def test_metaimage_reader(tmp_path, name, compressed, detached):
    vol = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 20
    path = tmp_path / name
    _write_mha(path, vol, compressed, detached)
    out, spacing = read_metaimage(path)
    assert out.dtype == np.float32 and np.array_equal(out, vol)
    assert spacing == (1.5, 1.5, 2.0)


def test_metaimage_errors(tmp_path):
    path = tmp_path / "t.mha"
    _write_mha(path, np.ones((4, 5, 6), dtype=np.int16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="t.mha: truncated MetaImage data"):
        read_metaimage(path)
    (tmp_path / "x.mha").write_text("hello\n")
    with pytest.raises(InputError, match="x.mha: not a MetaImage"):
        read_metaimage(tmp_path / "x.mha")


@pytest.fixture(scope="module")
def real_encoder(tmp_path_factory) -> dict:
    from checkpoint_factory import train_tiny_checkpoint

    from aad_med.data.preprocessing import PreprocessingConfig
    from aad_med.training.checkpoint import load_model_from_checkpoint

    root = tmp_path_factory.mktemp("real_scans")
    # The encoder sees both sources, on subjects never compared below.
    write_real_cohort(root / "train", "mni152", 4, seed=1, size=SIZE)
    write_real_cohort(root / "train", "nibabel_anatomical", 4, seed=1, size=SIZE)
    write_real_cohort(root / "mni", "mni152", 12, seed=2, size=SIZE)
    write_real_cohort(root / "anat", "nibabel_anatomical", 6, seed=2, size=SIZE)
    pre = PreprocessingConfig(patch_size=16, min_brain_fraction=0.25, eval_stride=8)
    ckpt = train_tiny_checkpoint(root / "ckpt.pt", root / "train", pre, epochs=4)
    model, pre, _ = load_model_from_checkpoint(ckpt)
    return {"root": root, "model": model, "preprocessing": pre}


@needs_sources
@pytest.mark.slow
def test_real_scans_halves_alike_sources_differ(real_encoder):
    from aad_med.distances import aad_permutation_test
    from aad_med.embedding import embed_cohort

    model, pre, root = real_encoder["model"], real_encoder["preprocessing"], real_encoder["root"]
    mni = embed_cohort(
        model, load_cohort(root / "mni"), pre, features="latent", progress=False
    ).vectors
    anat = embed_cohort(
        model, load_cohort(root / "anat"), pre, features="latent", progress=False
    ).vectors
    halves = aad_permutation_test(mni[:6], mni[6:], n_permutations=999, seed=0)
    sources = aad_permutation_test(mni[:6], anat, n_permutations=999, seed=0)
    assert halves.pvalue > 0.05, halves.pvalue
    assert sources.pvalue < 0.01, sources.pvalue
    assert sources.statistic > 2 * halves.statistic


@needs_sources
@pytest.mark.slow
def test_real_scan_noise_ladder_gives_increasing_aad(real_encoder):
    from aad_med.calibration.conditions import embed_conditions
    from aad_med.calibration.curves import calibration_rows, calibration_summary

    model, pre, root = real_encoder["model"], real_encoder["preprocessing"], real_encoder["root"]
    ladder = [0.0, 0.05, 0.1, 0.2, 0.4]
    emb = embed_conditions(
        model, load_cohort(root / "mni").subjects, pre, {"noise": ladder}, progress=False
    )
    # Same subjects, clean vs noisy: the mean embedding moves further with every step.
    paired = [
        np.linalg.norm(emb.vectors[emb.index("noise", s)].mean(0) - emb.vectors[0].mean(0))
        for s in ladder
    ]
    assert paired[0] == 0 and all(b > a for a, b in zip(paired, paired[1:], strict=False)), paired
    # Disjoint halves (the calibration design): mean AAD rises with severity, and the strongest
    # noise is detected in most repeats while no noise is not.
    rows = calibration_rows(emb, {"noise": ladder}, [6], repeats=10, n_permutations=199)
    summary = {s["severity"]: s for s in calibration_summary(rows)}
    means = [summary[s]["aad_mean"] for s in ladder]
    assert means[-1] > means[2] > means[0], means
    assert summary[0.4]["detection_rate"] >= 0.6 and summary[0.0]["detection_rate"] <= 0.2
