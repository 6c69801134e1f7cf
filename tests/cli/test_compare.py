"""``aad-compare`` end to end: Hydra overrides without ``+``, the installed console script on tiny
synthetic NIfTI cohorts with a tiny trained checkpoint (same site not significant, shifted site
significant, every output present, distances.json reproducible from embeddings.csv), the
embedding cache, the train-overlap warning, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
import torch
from checkpoint_factory import train_tiny_checkpoint

from aad_med import DEFAULT_FEATURES
from aad_med.cli import compare as compare_cli
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.synthetic import SITES, generate_cohort
from aad_med.data.validation import load_cohort
from aad_med.resources import CONFIG_DIR
from aad_med.training.checkpoint import save_checkpoint

SHAPE = (32, 36, 28)
PATCH = 16
PLOTS = (
    "latent_means",
    "latent_pca",
    "null_distribution",
    "pairwise_aad",
    "mds",
    "dendrogram",
    "attribution",
)
PAIR_KEYS = (
    "a",
    "b",
    "n_a",
    "n_b",
    "aad",
    "aad2_unbiased",
    "aad_ci95",
    "aad_p",
    "aad_p_fdr",
    "n_permutations",
    "aad_null_median",
    "aad_null_ratio",
    "aad_standardized",
    "hotelling_t2",
    "hotelling_p",
    "mmd2",
    "mmd_p",
    "energy",
    "energy_p",
    "frechet",
    "akld",
    "ks_dims_fdr",
    "top_dims",
)
# A shifted site the mean latent of a z-scored MSE autoencoder can see: another population
# (much smaller brains, larger tumours) on another scanner, FLAIR gain doubled.
SHIFTED = SITES["site_b"].with_updates(
    name="shifted", brain_size=0.75, tumour_size=2.0, scale=(1.0, 1.0, 1.0, 2.0)
)


def aad_compare() -> str:
    exe = Path(sys.executable).with_name("aad-compare")
    return str(exe) if exe.exists() else shutil.which("aad-compare")


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compare_data")
    generate_cohort(root / "train", 6, "reference", seed=100, shape=SHAPE, id_prefix="TrainRef_")
    generate_cohort(root / "train", 6, SHIFTED, seed=101, shape=SHAPE, id_prefix="TrainShift_")
    generate_cohort(root / "site_a", 10, "reference", seed=3, shape=SHAPE, id_prefix="A_")
    generate_cohort(root / "site_a2", 10, "reference", seed=4, shape=SHAPE, id_prefix="A2_")
    generate_cohort(root / "site_b", 10, SHIFTED, seed=11, shape=SHAPE, id_prefix="B_")
    generate_cohort(root / "single", 1, "reference", seed=12, shape=SHAPE, id_prefix="S_")
    pre = PreprocessingConfig(patch_size=PATCH, min_brain_fraction=0.25, eval_stride=8)
    ckpt = train_tiny_checkpoint(root / "ckpt.pt", root / "train", pre)
    return {"root": root, "ckpt": ckpt, "cache": root / "cache"}


def run_cli(args: list[str], cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "AAD_MED_CACHE": str(cache),
        "AAD_MED_VERBOSE": "0",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    return subprocess.run(
        [aad_compare(), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="session")
def three_sites(data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare_run") / "run"
    r = data["root"]
    proc = run_cli(
        [
            f"checkpoint={data['ckpt']}",
            f"cohorts.site_a={r / 'site_a'}",
            f"cohorts.site_a2={r / 'site_a2'}",
            f"cohorts.site_b={r / 'site_b'}",
            "stats.n_permutations=499",
            "stats.n_bootstrap=300",
            "seed=0",
            f"hydra.run.dir={out}",
        ],
        data["cache"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "proc": proc, "result": json.loads((out / "distances.json").read_text())}


def test_open_cohort_overrides():
    args = [
        "checkpoint=c.pt",
        "cohorts.a=/x",
        "+cohorts.b=/y",
        "++cohorts.c=/z",
        "seed=1",
        "cohorts.d=/with=equals",
        "calibration=/c/calibration.json",
    ]
    assert compare_cli.open_cohort_overrides(args) == [
        "checkpoint=c.pt",
        "++cohorts.a=/x",
        "+cohorts.b=/y",
        "++cohorts.c=/z",
        "seed=1",
        "++cohorts.d=/with=equals",
        # No config group is called calibration (aad-calibrate's is shifts): passed as is.
        "calibration=/c/calibration.json",
    ]


def test_config_composes_cohorts_without_plus():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    overrides = [
        "checkpoint=c.pt",
        "cohorts.site_a=/data/a",
        "cohorts.site_b=/data/b",
        "stats.n_permutations=499",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("compare", overrides=compare_cli.open_cohort_overrides(overrides))
        assert compare_cli.settings_from_config(cfg).calibration is None
        # No fixed-scale cohort unless embedding.reference names one (old checkpoints).
        assert compare_cli.settings_from_config(cfg).scale_reference is None
        with_ref = compose(
            "compare",
            overrides=compare_cli.open_cohort_overrides([*overrides, "embedding.reference=/r"]),
        )
        assert compare_cli.settings_from_config(with_ref).scale_reference == "/r"
        calibrated = compose(
            "compare",
            overrides=compare_cli.open_cohort_overrides([*overrides, "calibration=/c/cal.json"]),
        )
        assert compare_cli.settings_from_config(calibrated).calibration == "/c/cal.json"
        assert dict(cfg.cohorts) == {"site_a": "/data/a", "site_b": "/data/b"}
        assert cfg.stats.n_permutations == 499
        # The default by evidence (sensitivity benchmark), for aad-compare and aad-calibrate.
        assert (
            cfg.embedding.features == DEFAULT_FEATURES == "multiscale+input_texture+intensity_shape"
        )
        settings = compare_cli.settings_from_config(cfg)
        assert settings.n_permutations == 499 and settings.tests is None
        # Hydra itself refuses the new key; the rewrite is what makes the documented form work.
        with pytest.raises(ConfigCompositionException):
            compose("compare", overrides=overrides)


@pytest.mark.slow
def test_end_to_end_outputs_and_significance(three_sites, data):
    out, res = three_sites["out"], three_sites["result"]
    pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
    same, shifted = pairs[("site_a", "site_a2")], pairs[("site_a", "site_b")]
    assert same["aad_p"] > 0.05 and same["aad_p_fdr"] > 0.05
    assert shifted["aad_p"] < 0.01 and pairs[("site_a2", "site_b")]["aad_p"] < 0.01
    assert shifted["aad"] > same["aad"] and shifted["aad_null_ratio"] > 2
    for p in res["pairs"]:
        assert set(PAIR_KEYS) <= set(p)
        assert p["n_permutations"] == 499 and p["aad_ci95"][0] < p["aad_ci95"][1]
    # The interval is for the distance between the population means: it holds the
    # bias-corrected AAD (plain AAD is inflated by noise in the 76 default dimensions).
    assert shifted["aad_ci95"][0] <= shifted["aad_unbiased"] <= shifted["aad_ci95"][1]
    assert res["checkpoint"] == str(Path(data["ckpt"]).resolve())
    assert res["latent_dim"] == 8 and res["features"] == DEFAULT_FEATURES
    assert res["features_description"].startswith("multiscale: per encoder stage")
    for name in ("site_a", "site_a2", "site_b"):
        info = res["cohorts"][name]
        assert info["n_subjects"] == 10 and info["train_overlap"] == 0
        assert info["path"] == str((data["root"] / name).resolve())
    # Every output, valid.
    for f in (
        "distances.json",
        "embeddings.csv",
        "embeddings.npz",
        "pairwise_aad.csv",
        "report.md",
        "report.html",
        "regional_aad.png",
    ):
        assert (out / f).is_file(), f
    for key in PLOTS:
        img = mpimg.imread(out / "plots" / f"{key}.png")
        assert img.ndim == 3 and img.shape[0] > 100
    for a, b in pairs:
        img = nib.load(str(out / f"mean_difference_{a}_vs_{b}.nii.gz"))
        assert img.shape == (PATCH, PATCH, PATCH, 4)
        assert np.abs(np.asarray(img.dataobj)).max() > 0
        assert (out / f"mean_difference_{a}_vs_{b}.png").is_file()
    regional = nib.load(str(out / "regional_aad.nii.gz"))
    assert regional.shape == (*SHAPE, 3)  # one volume per pair, in the input image space
    vol = np.asarray(regional.dataobj)
    assert np.isfinite(vol).any() and np.nanmax(vol[..., 1]) > np.nanmax(vol[..., 0])
    assert res["regional"]["available"] is True
    # Nothing half-written is left behind.
    assert not [p for p in out.iterdir() if p.name.startswith(".aad-compare")]
    assert not list(out.rglob("*.tmp*"))
    # The report carries the numbers and the explanations.
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for text in (md, page):
        assert f"{shifted['aad']:.3g}" in text and "What each number means" in text
        assert "What AAD cannot see" in text and "WARNING" not in text
    assert "data:image/png;base64," in page and "src='plots/" not in page


@pytest.mark.slow
def test_distances_json_recomputes_from_embeddings_csv(three_sites):
    from aad_med.distances import compare_embeddings
    from aad_med.embedding import read_embeddings_csv

    out, res = three_sites["out"], three_sites["result"]
    vectors = read_embeddings_csv(out / "embeddings.csv")
    # multiscale+input_texture+intensity_shape of the (8, 16)-channel encoder: 2 x (8 + 16)
    # channel means and SDs, the 4 input channels' variogram at 3 lags, and 9 quantiles,
    # skewness and kurtosis of the 4 channels.
    assert res["dim"] == 2 * (8 + 16) + 4 * 3 + 4 * (9 + 2)
    assert {k: v.shape for k, v in vectors.items()} == {
        "site_a": (10, res["dim"]),
        "site_a2": (10, res["dim"]),
        "site_b": (10, res["dim"]),
    }
    again = compare_embeddings(vectors, n_permutations=499, n_bootstrap=300, seed=0)
    for p, q in zip(res["pairs"], again["pairs"], strict=True):
        for key in (
            "aad",
            "aad2_unbiased",
            "aad_p",
            "aad_p_fdr",
            "aad_null_median",
            "aad_standardized",
            "mmd2",
            "mmd_p",
            "energy",
            "frechet",
        ):
            assert p[key] == pytest.approx(q[key], rel=1e-9, abs=1e-12), key
        assert p["aad_ci95"] == pytest.approx(q["aad_ci95"], rel=1e-9)
    np.testing.assert_allclose(res["pairwise_aad"]["matrix"], again["pairwise_aad"]["matrix"])
    with np.load(out / "embeddings.npz") as d:
        assert str(d["features"]) == res["features"] == DEFAULT_FEATURES
        for name in vectors:
            np.testing.assert_array_equal(d["vectors"][d["cohorts"] == name], vectors[name])
        # The plain latent means are kept beside the vectors the statistics used.
        assert d["latent_means"].shape == (30, 8)
        latent = {n: d["latent_means"][d["cohorts"] == n] for n in vectors}
    # The seed's latent AAD is always computed: same permutations, bootstrap and seed.
    seed_stats = compare_embeddings(
        latent, n_permutations=499, n_bootstrap=300, seed=0, tests=("aad",)
    )
    for p, q in zip(res["pairs"], seed_stats["pairs"], strict=True):
        exact = np.linalg.norm(latent[p["a"]].mean(axis=0) - latent[p["b"]].mean(axis=0))
        assert p["latent_aad"] == pytest.approx(exact, rel=1e-12)
        assert p["latent_aad_p"] == q["aad_p"] and p["latent_aad_p_fdr"] == q["aad_p_fdr"]
        assert p["latent_aad_ci95"] == pytest.approx(q["aad_ci95"], rel=1e-12)
        assert p["latent_aad_null_ratio"] == pytest.approx(q["aad_null_ratio"], rel=1e-12)
    md = (out / "report.md").read_text()
    assert f"AAD ({DEFAULT_FEATURES}) [95% CI]" in md and "seed's latent AAD [95% CI]" in md
    assert f"{res['pairs'][0]['latent_aad']:.3g}" in md


@pytest.mark.slow
def test_intensity_fingerprint_recomputes_from_its_csv(three_sites):
    import csv

    from aad_med.distances import compare_embeddings
    from aad_med.distances.univariate import bh_fdr
    from aad_med.embedding.acquisition import standardize_jointly

    out, res = three_sites["out"], three_sites["result"]
    with open(out / "intensity_fingerprint.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["subject_id", "cohort", "t1_p1"] and len(rows[0]) == 2 + 4 * 7
    assert rows[0][2:] == res["intensity"]["columns"]
    raw: dict[str, list] = {}
    for row in rows[1:]:
        raw.setdefault(row[1], []).append([float(v) for v in row[2:]])
    assert {k: len(v) for k, v in raw.items()} == {"site_a": 10, "site_a2": 10, "site_b": 10}
    # Each pair standardised over its own subjects, then the p-values adjusted across pairs.
    again = [
        compare_embeddings(
            standardize_jointly({p["a"]: raw[p["a"]], p["b"]: raw[p["b"]]}),
            n_permutations=499,
            n_bootstrap=300,
            seed=0,
            tests=("aad",),
        )["pairs"][0]
        for p in res["pairs"]
    ]
    q_values = bh_fdr([q["aad_p"] for q in again])
    for p, q, q_value in zip(res["pairs"], again, q_values, strict=True):
        assert p["intensity_distance"] == pytest.approx(q["aad"], rel=1e-12)
        assert p["intensity_p"] == q["aad_p"] and p["intensity_p_fdr"] == q_value
    pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
    # site_b's scanner doubles the FLAIR gain: its raw FLAIR percentiles are higher.
    assert pairs[("site_a", "site_b")]["intensity_p"] < 0.01
    med = res["intensity"]["cohort_medians"]
    assert med["site_b"]["flair_p50"] > 1.5 * med["site_a"]["flair_p50"]
    md = (out / "report.md").read_text()
    assert "intensity fingerprint p (FDR), not an AAD" in md
    assert "bias-field differences that normalisation hides from the encoder" in md
    assert "it is its own statistic, not an AAD" in md


@pytest.mark.slow
def test_latent_features_reproduce_the_seed_aad(data, tmp_path):
    """embedding.features=latent: AAD is the distance between the cohorts' mean patch-latent
    means, exactly as the seed defined it, recomputed from embeddings.npz."""
    r = data["root"]
    out = tmp_path / "latent"
    proc = run_cli(
        [
            f"checkpoint={data['ckpt']}",
            f"cohorts.site_a={r / 'site_a'}",
            f"cohorts.site_b={r / 'site_b'}",
            "embedding.features=latent",
            "stats.n_permutations=99",
            "stats.n_bootstrap=50",
            "stats.bands_bootstrap=50",
            "stats.tests=[aad]",
            "stats.intensity=false",
            "decode_means=false",
            "regional=false",
            f"hydra.run.dir={out}",
        ],
        data["cache"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "distances.json").read_text())
    assert res["features"] == "latent" and res["dim"] == res["latent_dim"] == 8
    with np.load(out / "embeddings.npz") as d:
        np.testing.assert_array_equal(d["vectors"], d["latent_means"])
        lat = {n: d["latent_means"][d["cohorts"] == n] for n in ("site_a", "site_b")}
    seed_aad = np.linalg.norm(lat["site_a"].mean(axis=0) - lat["site_b"].mean(axis=0))
    assert res["pairs"][0]["aad"] == pytest.approx(seed_aad, rel=1e-12, abs=1e-15)
    # The AAD is the latent one: no separate latent columns.
    assert "latent_aad" not in res["pairs"][0]
    assert "seed's latent AAD" not in (out / "report.md").read_text()
    # stats.intensity=false: no intensity fingerprint statistic, no file.
    assert "intensity_p" not in res["pairs"][0] and "intensity" not in res
    assert not (out / "intensity_fingerprint.csv").exists()


@pytest.mark.slow
def test_rerun_uses_cache_and_warns_about_training_subjects(three_sites, data, tmp_path):
    r = data["root"]
    out = tmp_path / "rerun"
    proc = run_cli(
        [
            f"checkpoint={data['ckpt']}",
            f"cohorts.site_a={r / 'site_a'}",
            f"cohorts.train={r / 'train'}",
            "stats.n_permutations=99",
            "stats.n_bootstrap=50",
            "stats.tests=[aad]",
            "decode_means=false",
            f"hydra.run.dir={out}",
        ],
        data["cache"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "compare.log").read_text()
    assert "cohort site_a: embeddings read from cache" in log
    assert "encoded 12 subjects of train" in log
    res = json.loads((out / "distances.json").read_text())
    assert res["cohorts"]["train"]["train_overlap"] == 12
    assert res["cohorts"]["site_a"]["train_overlap"] == 0
    assert res["pairs"][0]["mmd2"] is None  # tests=[aad] skips the kernel tests
    assert "WARNING" in log and "12 of 12 subjects of train" in log
    md = (out / "report.md").read_text()
    assert "WARNING: training subjects among the compared cohorts" in md
    # Same encodings as the first run for the cached cohort. (The statistics' vectors are
    # standardised over the subjects compared together, which differ between the two runs.)
    with (
        np.load(three_sites["out"] / "embeddings.npz") as d1,
        np.load(out / "embeddings.npz") as d2,
    ):
        np.testing.assert_array_equal(
            d2["latent_means"][d2["cohorts"] == "site_a"],
            d1["latent_means"][d1["cohorts"] == "site_a"],
        )


def _run_in_process(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["aad-compare", *args])
    monkeypatch.setenv("AAD_MED_VERBOSE", "0")
    with pytest.raises(SystemExit) as exc:
        compare_cli.main()
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case", ["missing_checkpoint", "one_subject", "one_cohort", "patch_mismatch", "no_checkpoint"]
)
def test_errors_are_one_line_exit_2(case, data, tmp_path, monkeypatch, capsys):
    r = data["root"]
    ckpt = str(data["ckpt"])
    cohorts = [f"cohorts.site_a={r / 'site_a'}", f"cohorts.site_a2={r / 'site_a2'}"]
    expected = {
        "missing_checkpoint": "nope.pt: checkpoint does not exist",
        "one_subject": "cohort single",
        "one_cohort": "needs at least two cohorts",
        "patch_mismatch": "16-voxel patches",
        "no_checkpoint": "checkpoint=PATH is required",
    }[case]
    if case == "missing_checkpoint":
        args = [f"checkpoint={tmp_path / 'nope.pt'}", *cohorts]
    elif case == "one_subject":
        args = [f"checkpoint={ckpt}", cohorts[0], f"cohorts.single={r / 'single'}"]
    elif case == "one_cohort":
        args = [f"checkpoint={ckpt}", cohorts[0]]
    elif case == "patch_mismatch":
        bad = torch.load(ckpt, weights_only=True)
        bad["preprocessing"]["patch_size"] = 8
        save_checkpoint(tmp_path / "bad.pt", bad)
        args = [f"checkpoint={tmp_path / 'bad.pt'}", *cohorts]
    else:
        args = cohorts
    code, err = _run_in_process(
        [*args, f"hydra.run.dir={tmp_path / 'out'}", f"embedding.cache_dir={tmp_path / 'cache'}"],
        monkeypatch,
        capsys,
    )
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("aad-compare: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    leftovers = (
        list((tmp_path / "out").glob(".aad-compare-*")) if (tmp_path / "out").exists() else []
    )
    assert not leftovers


@pytest.mark.slow
def test_several_checkpoints_combine_encoders(data, tmp_path):
    from aad_med.pipelines.compare import CompareSettings, run_comparison

    other = torch.load(data["ckpt"], weights_only=True)
    gen = torch.Generator().manual_seed(1)
    other["model_state"] = {
        k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=gen)
        if v.is_floating_point()
        else v
        for k, v in other["model_state"].items()
    }
    second = save_checkpoint(tmp_path / "seed1.pt", other)
    r = data["root"]
    settings = CompareSettings(
        n_permutations=99,
        n_bootstrap=50,
        tests=["aad"],
        decode_means=False,
        regional=False,
        progress=False,
        cache_dir=tmp_path / "cache",
        bands_bootstrap=50,
    )
    out = tmp_path / "multi"
    res = run_comparison(
        [data["ckpt"], second], {"site_a": r / "site_a", "site_b": r / "site_b"}, out, settings
    )
    enc = res["encoders"]
    assert enc["n_encoders"] == 2 and len(res["checkpoints"]) == 2
    pair = enc["pairs"][0]
    assert pair["aad_per_encoder"][0] == pytest.approx(res["pairs"][0]["aad"])
    assert pair["aad_interval"][0] <= pair["aad_mean"] <= pair["aad_interval"][1]
    assert pair["n_encoders_significant"] == 2
    second_res = json.loads((out / "encoders" / "encoder1" / "distances.json").read_text())
    assert second_res["pairs"][0]["aad"] == pytest.approx(pair["aad_per_encoder"][1])
    assert "aad_bootstrap_sample" not in json.dumps(res)
    assert "Encoder uncertainty (2 encoders)" in (out / "report.md").read_text()
    assert not list(out.glob(".aad-compare-*"))


def test_train_overlap_matches_place_not_only_id(tmp_path):
    from aad_med.pipelines.compare import train_overlap
    from tests.nifti_factory import write_brats_cohort

    train = write_brats_cohort(tmp_path / "train", n=3)
    other = write_brats_cohort(tmp_path / "site_a", n=2)  # same IDs, other subjects
    ids = load_cohort(train).subject_ids
    ckpt = {
        "train_subject_ids": ids,
        "train_subjects": [{"cohort": str(train), "subject_id": i} for i in ids],
    }
    assert train_overlap(load_cohort(train), ckpt) == 3
    assert train_overlap(load_cohort(other), ckpt) == 0
    # A CSV manifest trained on: subjects inside its folder count.
    csv_ckpt = {
        "train_subjects": [
            {"cohort": str(tmp_path / "train" / "m.csv"), "subject_id": i} for i in ids
        ]
    }
    assert train_overlap(load_cohort(train), csv_ckpt) == 3
    # Older checkpoints: IDs only.
    assert train_overlap(load_cohort(other), {"train_subject_ids": ids}) == 2
