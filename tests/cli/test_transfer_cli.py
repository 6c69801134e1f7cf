"""aad-transfer as users call it (a subprocess), and its config: stable keys, cohort overrides
without '+', one-line errors, run-folder safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from checkpoint_factory import write_tiny_checkpoint
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from aad_med import DEFAULT_FEATURES
from aad_med.cli.transfer import open_cohort_overrides, settings_from_config
from aad_med.data.synthetic import generate_cohort
from aad_med.data.validation import load_cohort
from aad_med.resources import CONFIG_DIR
from tests.cli.conftest import run_cli

SHAPE = (24, 24, 24)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("transfer_cli")
    paths = {"source": generate_cohort(root / "source", 6, "reference", 0, SHAPE)}
    for name, site in {"a": "reference", "b": "noise", "c": "blur"}.items():
        paths[name] = generate_cohort(root / name, 2, site, 1, SHAPE, start_index=50)
    paths["encoder"] = write_tiny_checkpoint(root / "enc.pt")
    lines = ["cohort,subject_id,score"]
    for name, score in {"source": 0.9, "a": 0.85, "b": 0.6, "c": 0.4}.items():
        lines += [f"{name},{sid},{score}" for sid in load_cohort(paths[name]).subject_ids]
    paths["perf"] = root / "perf.csv"
    paths["perf"].write_text("\n".join(lines) + "\n")
    return paths


def _args(data, out, *extra):
    return [
        f"checkpoint={data['encoder']}", f"source={data['source']}",
        f"targets.a={data['a']}", f"targets.b={data['b']}", f"targets.c={data['c']}",
        "segmenter=tiny", "stats.n_permutations=19", "stats.n_bootstrap=50",
        "correlation_bootstrap=100", "device=cpu", f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_performance_run_then_refused_rerun(data, tmp_path):
    out = tmp_path / "run"
    done = run_cli("transfer", _args(data, out, f"performance={data['perf']}"))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "transfer.json").read_text())
    assert result["source"]["name"] == "source" and result["source"]["n_test"] == 6
    assert [t["name"] for t in result["targets"]] == ["a", "b", "c"]
    assert [round(t["dice_drop"], 6) for t in result["targets"]] == [0.05, 0.3, 0.5]
    assert "aad" in result["correlations"] and "latent_aad" in result["correlations"]
    again = run_cli("transfer", _args(data, out, f"performance={data['perf']}"))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        line
        for line in again.stderr.strip().splitlines()
        if line.startswith("aad-transfer: error:")
    ]
    assert "already holds results" in again.stderr and "overwrite=true" in again.stderr
    replaced = run_cli(
        "transfer", _args(data, out, f"performance={data['perf']}", "overwrite=true")
    )
    assert replaced.returncode == 0, replaced.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["target=/x"], "either source=DIR"),
        (["segmenter.patch_size=18"], "multiple of 4"),
    ],
    ids=["both_modes", "bad_patch"],
)
def test_bad_settings_fail_in_one_line_and_leave_no_folder(data, tmp_path, extra, message):
    out = tmp_path / "run"
    done = run_cli("transfer", _args(data, out, *extra))
    assert done.returncode == 2
    assert message in done.stderr
    assert all(line.startswith("aad-transfer: error:") for line in done.stderr.strip().splitlines())
    assert not out.exists()


def test_overrides_need_no_plus():
    assert open_cohort_overrides(["targets.x=/a", "sources.y=/b", "++targets.z=/c", "seed=1"]) == [
        "++targets.x=/a", "++sources.y=/b", "++targets.z=/c", "seed=1",
    ]  # fmt: skip


@pytest.fixture
def composed():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda *o: compose(config_name="transfer", overrides=list(o))
    GlobalHydra.instance().clear()


def test_stable_keys_reach_the_settings(composed):
    cfg = composed(
        "segmenter.max_epochs=3", "segmenter.patch_size=48", "segmenter.device=cpu", "seed=7",
        "checkpoint=x.pt",
    )  # fmt: skip
    s = settings_from_config(cfg)
    assert s.segmenter.max_epochs == 3 and s.segmenter.patch_size == 48
    assert s.segmenter.device == "cpu" and s.segmenter.seed == 7 and s.seed == 7
    assert s.segmenter.network.architecture == "unet"
    assert s.features == DEFAULT_FEATURES
    seg = settings_from_config(composed("segmenter=segresnet", "checkpoint=x.pt")).segmenter
    assert seg.network.architecture == "segresnet" and seg.network.regions == ("WT", "TC", "ET")


@pytest.mark.slow
def test_training_run(data, tmp_path):
    out = tmp_path / "run"
    done = run_cli("transfer", _args(data, out, "seed=1"))
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "transfer.json").read_text())
    assert result["source"]["n_train"] + result["source"]["n_test"] == 6
    assert (out / "segmenter" / "checkpoints" / "last.pt").exists()
    assert result["settings"]["seed"] == 1
