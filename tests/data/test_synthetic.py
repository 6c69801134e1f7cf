"""Tests of the synthetic cohort generator: determinism, layouts, anatomy shared across sites,
tumour appearance, and that every site parameter moves simple image statistics the intended way."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from aad_med import CHANNELS
from aad_med.data import synthetic as syn
from aad_med.data.synthetic import (
    SITES,
    SiteParams,
    generate_cohort,
    generate_subject,
    subject_seed,
)
from aad_med.errors import ConfigError, InputError

SHAPE = (32, 36, 28)
REF = SITES["reference"]
QUIET = REF.with_updates(noise=0.0, bias_field=0.0)  # noiseless: tissue appearance tests


def subject(site, i: int = 0, seed: int = 0, shape=SHAPE) -> dict[str, np.ndarray]:
    return generate_subject(f"s{i}", site, subject_seed(seed, i), shape)


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def laplacian_energy(img: np.ndarray) -> float:
    """Mean squared Laplacian inside the (eroded) brain, intensity-normalised: fine texture."""
    inner = ndimage.binary_erosion(img > 0, iterations=2)
    x = img / img[inner].mean()
    return float(np.mean(ndimage.laplace(x)[inner] ** 2))


def octant_spread(img: np.ndarray, seg: np.ndarray) -> float:
    """Coefficient of variation of the bright-tissue level (80th percentile, tumour excluded)
    across the brain's eight octants: large-scale intensity non-uniformity."""
    brain = img > 0
    centre = np.array(np.nonzero(brain)).mean(axis=1)
    idx = np.indices(img.shape)
    levels = []
    for sx in (False, True):
        for sy in (False, True):
            for sz in (False, True):
                sel = brain & (seg == 0)
                sel &= ((idx[0] > centre[0]) == sx) & ((idx[1] > centre[1]) == sy)
                sel &= (idx[2] > centre[2]) == sz
                levels.append(np.percentile(img[sel], 80))
    levels = np.array(levels)
    return float(levels.std() / levels.mean())


def contrast_ratio(img: np.ndarray) -> float:
    fg = img[img > 0]
    return float(np.percentile(fg, 90) / np.percentile(fg, 25))


# ------------------------------------------------------------------------------ subjects


def test_subject_arrays_types_background_and_labels():
    vols = subject(REF)
    assert set(vols) == {*CHANNELS, "seg"}
    brain = vols["t1"] != 0
    assert 0.1 < brain.mean() < 0.5
    for ch in CHANNELS:
        assert vols[ch].dtype == np.float32 and vols[ch].shape == SHAPE
        assert np.all(np.isfinite(vols[ch]))
        # Same skull-stripping mask for every modality, background exactly zero.
        np.testing.assert_array_equal(vols[ch] != 0, brain)
    assert vols["seg"].dtype == np.int16
    assert set(np.unique(vols["seg"])) == {0, 1, 2, 4}
    assert not np.any(vols["seg"][~brain])


@pytest.mark.parametrize("name", sorted(SITES))
def test_every_preset_keeps_background_zero_and_brain_nonzero(name):
    site = SITES[name].with_updates(offset=(-50.0, 0.0, 20.0, 0.0))
    vols = subject(site, i=1)
    mask = vols["t1"] != 0
    for ch in CHANNELS:
        np.testing.assert_array_equal(vols[ch] != 0, mask)
    assert set(np.unique(vols["seg"])) <= {0, 1, 2, 4}


def test_same_seed_same_arrays_other_seed_other_anatomy():
    a, b = subject(REF, 3), subject(REF, 3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = subject(REF, 3, seed=1)
    assert not np.array_equal(a["seg"], c["seg"])
    assert not np.array_equal(a["t1"] != 0, c["t1"] != 0)
    # An int seed works too and is deterministic.
    np.testing.assert_array_equal(
        generate_subject("x", "reference", 7, SHAPE)["t2"],
        generate_subject("x", REF, 7, SHAPE)["t2"],
    )


def test_acquisition_shifts_keep_the_anatomy_of_each_subject():
    """Same seed, different scanner: identical brain mask and tumour; only intensities move."""
    for i in range(3):
        ref = subject(REF, i)
        for name in ("noise", "blur", "gamma", "bias", "intensity", "scanner_b"):
            other = subject(SITES[name], i)
            np.testing.assert_array_equal(other["seg"], ref["seg"])
            np.testing.assert_array_equal(other["flair"] != 0, ref["flair"] != 0)
            assert not np.array_equal(other["flair"], ref["flair"])


def test_tumour_appearance_differs_by_modality_as_in_gliomas():
    for i in range(3):
        v = subject(QUIET, i)
        seg = v["seg"]
        normal = (v["t1"] > 0) & (seg == 0)
        mean = {(ch, lab): float(v[ch][seg == lab].mean()) for ch in CHANNELS for lab in (1, 2, 4)}
        pct = {
            (ch, q): float(np.percentile(v[ch][normal], q)) for ch in CHANNELS for q in (50, 75, 95)
        }
        # Enhancing rim: above white matter (the brightest normal tissue) after contrast, not
        # before it (partial volume at this tiny size keeps the margin modest).
        assert mean["t1ce", 4] > 1.15 * pct["t1ce", 95]
        assert mean["t1", 4] < pct["t1", 95]
        assert mean["t1ce", 4] / pct["t1ce", 50] > 1.6 * mean["t1", 4] / pct["t1", 50]
        # Oedema: bright on FLAIR (above all normal tissue) and on T2, dark-ish on T1.
        assert mean["flair", 2] > pct["flair", 95]
        assert mean["t2", 2] > pct["t2", 75]
        assert mean["t1", 2] < pct["t1", 50]
        # Necrotic core: dark on T1ce (no enhancement), bright on T2.
        assert mean["t1ce", 1] < 0.6 * mean["t1ce", 4]
        assert mean["t2", 1] > pct["t2", 75]


def test_normal_tissue_contrast_orders():
    v = subject(QUIET.with_updates(tumour_prevalence=0.0), 2)
    brain = v["t1"] > 0
    # T1: WM bright, CSF dark; T2 the reverse; FLAIR suppresses CSF.
    t1, t2, flair = (v[ch][brain] for ch in ("t1", "t2", "flair"))
    wm_like = t1 > np.percentile(t1, 70)  # white matter
    csf_like = t2 > np.percentile(t2, 97)  # ventricles and sulci
    assert t2[wm_like].mean() < t2[~wm_like].mean()
    assert t1[csf_like].mean() < 0.5 * t1[wm_like].mean()
    assert flair[csf_like].mean() < 0.5 * flair[~csf_like].mean()
    assert not np.any(v["seg"])


# ------------------------------------------------------------------------------ site parameters


def test_noise_raises_and_blur_lowers_fine_texture():
    for i in range(3):
        ref = laplacian_energy(subject(REF, i)["t1"])
        assert laplacian_energy(subject(SITES["noise"], i)["t1"]) > 1.3 * ref
        assert laplacian_energy(subject(SITES["blur"], i)["t1"]) < 0.5 * ref
        assert laplacian_energy(subject(SITES["resolution"], i)["t1"]) < 0.5 * ref
        assert laplacian_energy(subject(REF.with_updates(noise=0.0), i)["t1"]) < ref


def test_noise_is_rician_with_the_requested_std_relative_to_white_matter():
    clean = subject(QUIET, 0)["t2"]
    noisy = subject(QUIET.with_updates(noise=0.1), 0)["t2"]
    # In bright tissue Rician noise is nearly Gaussian with the requested std.
    wm_t2 = syn._BASE_INTENSITY["t2"] * syn._CONTRAST["t2"]["wm"]
    bright = clean > 1.5 * wm_t2
    std = float(np.std(noisy[bright] - clean[bright]))
    assert std == pytest.approx(0.1 * wm_t2, rel=0.15)


@pytest.mark.parametrize("c", range(4))
def test_scale_and_offset_move_one_modality(c):
    ch = CHANNELS[c]
    ref = subject(REF, 1)
    scale = [1.0] * 4
    scale[c] = 1.3
    scaled = subject(REF.with_updates(scale=tuple(scale)), 1)
    brain = ref[ch] != 0
    assert scaled[ch][brain].mean() == pytest.approx(1.3 * ref[ch][brain].mean(), rel=1e-4)
    for other in CHANNELS:
        if other != ch:
            np.testing.assert_array_equal(scaled[other], ref[other])
    shifted = subject(REF.with_updates(offset={ch: 40.0}), 1)
    assert shifted[ch][brain].mean() == pytest.approx(ref[ch][brain].mean() + 40.0, rel=1e-4)
    assert not np.any(shifted[ch][~brain])


def test_bias_field_increases_large_scale_nonuniformity():
    ref, bias = [], []
    for i in range(6):
        r, b = subject(REF, i), subject(SITES["bias"], i)
        ref.append(octant_spread(r["t1"], r["seg"]))
        bias.append(octant_spread(b["t1"], b["seg"]))
    assert np.mean(bias) > 1.5 * np.mean(ref)
    assert sum(b > r for b, r in zip(bias, ref, strict=True)) >= 5


def test_gamma_increases_contrast():
    for i in range(3):
        ref = contrast_ratio(subject(REF, i)["t1"])
        assert contrast_ratio(subject(SITES["gamma"], i)["t1"]) > 1.2 * ref
        assert contrast_ratio(subject(REF.with_updates(gamma=0.7), i)["t1"]) < ref


def test_tumour_prevalence_sets_the_fraction_of_subjects_with_a_tumour():
    def with_tumour(prevalence: float) -> set[int]:
        site = REF.with_updates(tumour_prevalence=prevalence)
        return {i for i in range(12) if np.any(subject(site, i, shape=(20, 22, 18))["seg"])}

    none, low, high, full = (with_tumour(p) for p in (0.0, 0.4, 0.8, 1.0))
    assert none == set() and full == set(range(12))
    # Raising the prevalence only adds tumours (a fixed draw per subject is compared with it).
    assert low < high < full
    assert 1 <= len(low) <= 9


def test_tumour_size_grows_the_segmentation():
    for i in range(3):
        small = np.count_nonzero(subject(REF.with_updates(tumour_size=0.7), i)["seg"])
        ref = np.count_nonzero(subject(REF, i)["seg"])
        large = np.count_nonzero(subject(REF.with_updates(tumour_size=1.5), i)["seg"])
        assert small < ref < large
        assert large > 2 * ref


def test_brain_size_and_skull_change_the_foreground():
    for i in range(3):
        ref = np.count_nonzero(subject(REF, i)["t1"])
        smaller = np.count_nonzero(subject(SITES["population_b"], i)["t1"])
        assert 0.55 * ref < smaller < 0.8 * ref  # 0.88 ** 3 = 0.68
        assert np.count_nonzero(subject(SITES["skull"], i)["t1"]) > 1.25 * ref


def test_population_b_has_smaller_brains_with_larger_tumours():
    for i in range(3):
        ref, pop = subject(REF, i), subject(SITES["population_b"], i)
        ref_frac = np.count_nonzero(ref["seg"]) / np.count_nonzero(ref["t1"])
        pop_frac = np.count_nonzero(pop["seg"]) / np.count_nonzero(pop["t1"])
        assert pop_frac > 1.5 * ref_frac


# ------------------------------------------------------------------------------ SiteParams


def test_site_params_forms_and_updates():
    s = SiteParams(scale={"t1ce": 1.2}, offset=5, downsample=[1, 1, 2])
    assert s.scale == (1.0, 1.2, 1.0, 1.0)
    assert s.offset == (5.0,) * 4
    assert s.downsample_factors == (1.0, 1.0, 2.0)
    t = s.with_updates(noise=0.1)
    assert t.noise == 0.1 and s.noise == 0.03 and t.scale == s.scale
    assert SiteParams(**{k: v for k, v in s.to_dict().items()}) == s
    json.dumps(s.to_dict())


@pytest.mark.parametrize(
    "changes",
    [
        {"noise": -0.1},
        {"gamma": 0.0},
        {"blur_sigma": -1},
        {"tumour_prevalence": 1.5},
        {"tumour_size": 0.0},
        {"brain_size": 2.0},
        {"bias_field": -0.2},
        {"scale": (1, 0, 1, 1)},
        {"scale": (1, 1)},
        {"scale": {"t3": 1.0}},
        {"downsample": 0.5},
        {"downsample": (1, 2)},
        {"colour": 3},
    ],
)
def test_invalid_site_parameters_raise_config_error(changes):
    with pytest.raises(ConfigError) as e:
        REF.with_updates(**changes)
    assert "\n" not in str(e.value)


def test_single_shift_presets_differ_from_reference_in_one_field():
    ref = REF.to_dict()
    for name in ("noise", "blur", "gamma", "bias", "intensity", "resolution"):
        diff = {k for k, v in SITES[name].to_dict().items() if v != ref[k]} - {"name"}
        assert len(diff) == 1, (name, diff)
    # Severity of the sensitivity targets (issue 9).
    assert SITES["noise"].noise == pytest.approx(4 * REF.noise)
    assert SITES["bias"].bias_field == pytest.approx(7 * REF.bias_field)
    assert SITES["blur"].blur_sigma == 1.2 and SITES["gamma"].gamma == 1.5


def test_bad_names_and_shapes():
    with pytest.raises(ConfigError, match="unknown site"):
        generate_subject("x", "nope", 0, SHAPE)
    with pytest.raises(ConfigError, match="shape"):
        generate_subject("x", REF, 0, (8, 30, 30))
    with pytest.raises(ConfigError, match="shape"):
        generate_subject("x", REF, 0, (30, 30))


# ------------------------------------------------------------------------------ cohorts on disk


def test_brats2021_layout_files_headers_and_values(tmp_path):
    root = generate_cohort(tmp_path / "c", n_subjects=2, site="reference", seed=0, shape=SHAPE)
    expected = {
        f"BraTS2021_{i:05d}/BraTS2021_{i:05d}_{m}.nii.gz"
        for i in range(2)
        for m in ("t1", "t1ce", "t2", "flair", "seg")
    }
    assert set(files_of(root)) == expected | {"synthetic.json"}
    in_memory = subject(REF, 1)
    for m in (*CHANNELS, "seg"):
        img = nib.load(root / "BraTS2021_00001" / f"BraTS2021_00001_{m}.nii.gz")
        assert img.shape == SHAPE
        assert np.allclose(np.abs(np.diag(img.affine)[:3]), 1.0)  # 1 mm isotropic
        assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # as BraTS releases
        data = np.asanyarray(img.dataobj)
        assert data.dtype == (np.int16 if m == "seg" else np.float32)
        np.testing.assert_array_equal(data, in_memory[m])
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["batches"][0]["site"]["name"] == "reference"
    assert meta["batches"][0]["shape"] == list(SHAPE)


def test_cohort_files_are_byte_reproducible(tmp_path):
    a = files_of(generate_cohort(tmp_path / "a", 2, "scanner_b", seed=5, shape=SHAPE))
    b = files_of(generate_cohort(tmp_path / "b", 2, "scanner_b", seed=5, shape=SHAPE))
    assert a == b
    # Rewriting in place gives the same bytes and leaves no temporary files.
    again = files_of(generate_cohort(tmp_path / "a", 2, "scanner_b", seed=5, shape=SHAPE))
    assert again == a
    other = files_of(generate_cohort(tmp_path / "c", 2, "scanner_b", seed=6, shape=SHAPE))
    assert set(other) == set(a)
    assert all(other[k] != a[k] for k in a if k.endswith(".nii.gz"))


def test_sites_share_anatomy_and_start_index_gives_other_subjects(tmp_path):
    a = generate_cohort(tmp_path / "a", 2, "reference", seed=0, shape=SHAPE)
    b = generate_cohort(tmp_path / "b", 2, "noise", seed=0, shape=SHAPE)
    a2 = generate_cohort(tmp_path / "a2", 2, "reference", seed=0, shape=SHAPE, start_index=2)
    seg = "BraTS2021_00001/BraTS2021_00001_seg.nii.gz"
    assert (a / seg).read_bytes() == (b / seg).read_bytes()
    assert sorted(p.name for p in a2.iterdir() if p.is_dir()) == [
        "BraTS2021_00002",
        "BraTS2021_00003",
    ]
    # Subject 2 of a2 is the subject generate_subject makes for (seed 0, index 2).
    data = np.asanyarray(nib.load(a2 / "BraTS2021_00002/BraTS2021_00002_flair.nii.gz").dataobj)
    np.testing.assert_array_equal(data, subject(REF, 2)["flair"])


EXPECTED_LAYOUT_FILES = {
    "brats2020": {"BraTS20_Training_001/BraTS20_Training_001_t1.nii",
                  "BraTS20_Training_001/BraTS20_Training_001_seg.nii"},
    "brats2023": {"BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
                  "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
                  "BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz"},
    "msd": {"imagesTr/BRATS_001.nii.gz", "labelsTr/BRATS_001.nii.gz", "dataset.json"},
    "csv": {"manifest.csv", "subject_00000_t1ce.nii.gz", "subject_00000_seg.nii.gz"},
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(EXPECTED_LAYOUT_FILES))
def test_other_layouts_are_read_back_by_discovery(tmp_path, layout):
    from aad_med.data.io import load_subject
    from aad_med.data.layouts import discover_cohort

    root = generate_cohort(tmp_path / layout, 2, "reference", seed=0, shape=SHAPE, layout=layout)
    assert EXPECTED_LAYOUT_FILES[layout] <= set(files_of(root))
    cohort = discover_cohort(root)
    assert cohort.layout == layout and len(cohort.subjects) == 2
    assert all(s.seg is not None for s in cohort.subjects)
    first = load_subject(cohort.subjects[0])
    expected = subject(REF, 0)
    for c, ch in enumerate(CHANNELS):
        np.testing.assert_array_equal(first.image[c], expected[ch])
    tumour = first.seg > 0
    np.testing.assert_array_equal(tumour, expected["seg"] > 0)
    if layout == "msd":
        # Decathlon labels: 1 oedema, 2 non-enhancing/necrotic core, 3 enhancing.
        assert np.all(first.seg[expected["seg"] == 2] == 1)
        assert np.all(first.seg[expected["seg"] == 4] == 3)
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["modality"]["0"] == "FLAIR" and meta["numTraining"] == 2


def test_without_seg_and_healthy_subjects(tmp_path):
    root = generate_cohort(tmp_path / "v", 1, "reference", shape=SHAPE, with_seg=False)
    assert not list(root.rglob("*_seg.nii.gz"))
    healthy = generate_cohort(tmp_path / "h", 1, "healthy", shape=SHAPE)
    seg = nib.load(healthy / "BraTS2021_00000/BraTS2021_00000_seg.nii.gz")
    assert not np.any(np.asanyarray(seg.dataobj))  # all-zero seg, still written


def test_id_prefix_and_appending_subjects_to_a_manifest(tmp_path):
    root = tmp_path / "m"
    generate_cohort(root, 1, "reference", shape=SHAPE, layout="csv", id_prefix="site7_")
    generate_cohort(root, 1, "noise", shape=SHAPE, layout="csv", id_prefix="site7_", start_index=1)
    rows = (root / "manifest.csv").read_text().splitlines()
    assert rows[0] == "subject_id,t1,t1ce,t2,flair,seg"
    assert [r.split(",")[0] for r in rows[1:]] == ["site7_00000", "site7_00001"]
    assert len(json.loads((root / "synthetic.json").read_text())["batches"]) == 2


def test_cohort_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        generate_cohort(tmp_path / "file", 1, shape=SHAPE)
    with pytest.raises(ConfigError, match="layout"):
        generate_cohort(tmp_path / "x", 1, shape=SHAPE, layout="nnunet")
    with pytest.raises(ConfigError, match="n_subjects"):
        generate_cohort(tmp_path / "x", 0, shape=SHAPE)


def test_fingerprint_sees_intensity_and_brain_size_shifts(tmp_path):
    fingerprint = pytest.importorskip("aad_med.data.fingerprint")
    from aad_med.data.layouts import discover_cohort

    def fp(site):
        root = generate_cohort(tmp_path / site, 3, site, seed=0, shape=SHAPE)
        return fingerprint.cohort_fingerprint(discover_cohort(root))

    ref, bright, small = fp("reference"), fp("intensity"), fp("population_b")
    for ch in CHANNELS:
        ratio = bright["intensity"][ch]["mean"] / ref["intensity"][ch]["mean"]
        assert ratio == pytest.approx(1.5, rel=1e-3)
    assert small["brain_volume_ml"]["mean"] < 0.8 * ref["brain_volume_ml"]["mean"]
