"""Every option of every config group composes with Hydra's compose API and its ``_target_``
nodes instantiate; run folders are unique."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from aad_med.errors import ConfigError
from aad_med.pipelines.rundir import run_id
from aad_med.resources import CONFIG_DIR
from aad_med.training.config import (
    instantiate,
    missing_keys,
    preprocessing_from_config,
    settings_from_config,
    split_subjects,
)
from tests.training.conftest import compose_train

GROUPS = (
    "data",
    "model",
    "optim",
    "trainer",
    "logger",
    "paths",
    "hydra",
    "experiment",
    "debug",
    "launcher",
)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), f"configs/{group}/ is empty"
    assert {"synthetic", "brats"} <= set(_options("data"))
    assert {"cpu", "gpu", "ddp"} <= set(_options("trainer"))
    assert {"tensorboard", "none"} <= set(_options("logger"))


@pytest.mark.parametrize("group,option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(group, option, tmp_path):
    overrides = [f"{group}={option}", f"paths.output_dir={tmp_path}", "data.cohorts=[/x]"]
    if group == "data" and option == "synthetic":
        overrides.remove("data.cohorts=[/x]")
    cfg = compose_train(overrides, return_hydra_config=True)
    assert missing_keys(cfg) == []
    hydra_node = cfg.hydra
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(body)  # every interpolation resolves
    assert str(hydra_node.run.dir).startswith(str(tmp_path))
    model = instantiate(cfg.model, "model")
    assert model.patch_size == cfg.data.patch_size
    assert model.to_latent.out_features == cfg.model.latent_dim * (2 if model.variational else 1)
    opt = instantiate(cfg.optim.optimizer, "optim.optimizer")(model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    logger = instantiate(cfg.logger, "logger", log_dir=str(tmp_path / "tb"))
    logger.log_scalars({"x": 1.0}, 0)
    logger.close()
    settings = settings_from_config(cfg)
    assert settings.batch_size == cfg.trainer.batch_size
    assert preprocessing_from_config(cfg.data).patch_size == cfg.data.patch_size
    if group == "launcher" and option == "slurm":
        assert hydra_node.launcher._target_.endswith("SlurmLauncher")
        assert hydra_node.launcher.gpus_per_node == 1


def test_stable_command_line_keys():
    cfg = compose_train(
        [
            "data.cohorts=[/a,/b.csv]",
            "data.patch_size=16",
            "data.samples_per_subject=3",
            "model.latent_dim=7",
            "trainer.max_epochs=5",
            "trainer.batch_size=6",
            "trainer.device=cpu",
            "trainer.resume=/r/last.pt",
            "seed=11",
        ]
    )
    assert list(cfg.data.cohorts) == ["/a", "/b.csv"]
    assert cfg.model.patch_size == 16, "the model follows data.patch_size"
    s = settings_from_config(cfg)
    assert (s.max_epochs, s.batch_size, s.seed, s.resume) == (5, 6, 11, "/r/last.pt")
    assert cfg.model.latent_dim == 7 and cfg.data.samples_per_subject == 3


def test_brats_data_leaves_cohorts_mandatory():
    cfg = compose_train(["data=brats"])
    assert missing_keys(cfg) == ["data.cohorts"]


def test_experiment_overrides_groups():
    cfg = compose_train(["experiment=brats_baseline", "data.cohorts=[/d]"])
    assert cfg.trainer.device == "cuda" and cfg.trainer.precision == "bf16"
    assert cfg.trainer.max_epochs == 100
    tiny = compose_train(["experiment=tiny_cpu"])
    assert tiny.trainer.device == "cpu" and tiny.model.patch_size == 16


def test_instantiate_errors_name_the_key():
    cfg = compose_train(["data.cohorts=[/x]", "model.strides=[2,2]"])
    with pytest.raises(ConfigError, match=r"^model: .*equal length"):
        instantiate(cfg.model, "model")
    cfg = compose_train(["data.cohorts=[/x]", "optim.optimizer._target_=torch.optim.Nope"])
    with pytest.raises(ConfigError, match=r"^optim.optimizer: cannot build 'torch.optim.Nope'"):
        instantiate(cfg.optim.optimizer, "optim.optimizer")(torch.nn.Linear(1, 1).parameters())


def test_run_ids_are_unique_and_shared_under_torchrun(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ids = {run_id() for _ in range(200)}
    assert len(ids) == 200, "runs started in the same second (or microsecond) never collide"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc-uuid")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    a = run_id()
    assert a == run_id() and a.startswith("ddp_"), "every rank of one launch agrees"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "other-uuid")
    assert run_id() != a


def test_only_rank_zero_writes_hydra_subdir(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    cfg = compose_train(["data.cohorts=[/x]"], return_hydra_config=True)
    assert cfg.hydra.output_subdir is None
    monkeypatch.setenv("RANK", "0")
    cfg = compose_train(["data.cohorts=[/x]"], return_hydra_config=True)
    # Staged per process; made .hydra/ only with results (rundir.finish_hydra_subdir).
    assert cfg.hydra.output_subdir == f".hydra.pending-{os.getpid()}"
    assert os.environ["RANK"] == "0"


@pytest.mark.parametrize("n,frac", [(10, 0.2), (5, 0.25), (2, 0.5), (1, 0.2), (7, 0.0)])
def test_subject_split_is_seeded_disjoint_and_nonempty(n, frac):
    train, val = split_subjects(n, frac, seed=3)
    assert sorted(train + val) == list(range(n))
    assert train and (val or frac == 0 or n == 1)
    assert split_subjects(n, frac, seed=3) == (train, val)
    if n >= 5 and frac:
        assert {tuple(split_subjects(n, frac, seed=s)[1]) for s in range(10)} != {tuple(val)}


def test_split_rejects_bad_fraction():
    with pytest.raises(ConfigError, match="val_fraction"):
        split_subjects(5, 1.0, 0)
