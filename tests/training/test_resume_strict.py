"""Resume is strict: a checkpoint continues only the run it came from. Other data, seed,
optimisation settings or patch sampling are refused with one line naming the checkpoint and
every differing key, before anything in the run folder changes; with
``+trainer.resume_allow_changes=true`` the run continues and the checkpoint keeps every subject
it was ever trained on, so the train-overlap check of aad-compare still sees them."""

from __future__ import annotations

import pytest
import torch

from aad_med.data.validation import load_cohort
from aad_med.errors import CheckpointError
from aad_med.pipelines.compare import train_overlap
from aad_med.pipelines.train import train_from_config
from aad_med.training.checkpoint import load_checkpoint, resume_config_differences
from tests.nifti_factory import write_brats_cohort
from tests.training.conftest import compose_train, tiny_overrides


@pytest.fixture
def half_run(tiny_cohort, tmp_path):
    """One of two epochs trained: ``(overrides, run folder, last.pt)``."""
    over = tiny_overrides(tiny_cohort, tmp_path)
    run = tmp_path / "run"
    train_from_config(compose_train([*over, "trainer.epochs_per_run=1"]), run)
    return over, run, run / "checkpoints" / "last.pt"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("seed=7", "seed (0 -> 7)"),
        ("optim.optimizer.lr=0.01", "optim.optimizer.lr (0.001 -> 0.01)"),
        ("optim=adam", "optim.optimizer._target_"),
        ("optim.warmup_epochs=0", "optim.warmup_epochs"),
        ("data.samples_per_subject=3", "data.samples_per_subject (2 -> 3)"),
        ("data.val_fraction=0.4", "data.val_fraction"),
        ("trainer.max_epochs=5", "trainer.max_epochs (2 -> 5)"),
        ("trainer.batch_size=2", "trainer.batch_size (4 -> 2)"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_keys(half_run, change, key):
    over, run, last = half_run
    before = (last.read_bytes(), (run / "config.yaml").read_text())
    cfg = compose_train([*over, change, f"trainer.resume={last}"])
    with pytest.raises(CheckpointError) as e:
        train_from_config(cfg, run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{last}: refusing to resume")
    assert key in msg and "resume_allow_changes=true" in msg
    assert (last.read_bytes(), (run / "config.yaml").read_text()) == before


def test_resume_with_other_cohort_is_refused(half_run, tmp_path):
    over, run, last = half_run
    other = write_brats_cohort(tmp_path / "other", n=5, scale=2.0)
    cfg = compose_train([*over, f"data.cohorts=[{other}]", f"trainer.resume={last}"])
    with pytest.raises(CheckpointError, match=r"refusing to resume.*data\.cohorts"):
        train_from_config(cfg, run)


def test_changed_cohort_content_under_the_same_path_is_refused(half_run, tiny_cohort):
    over, run, last = half_run
    # Same config, other subjects: one subject more in the training cohort's folder.
    write_brats_cohort(tiny_cohort, n=7)
    with pytest.raises(CheckpointError, match=r"refusing to resume.*subjects"):
        train_from_config(compose_train([*over, f"trainer.resume={last}"]), run)


def test_loading_only_settings_may_change(half_run):
    over, run, last = half_run
    cfg = compose_train([*over, "data.num_workers=0", "data.cache=none", f"trainer.resume={last}"])
    result = train_from_config(cfg, run)
    assert load_checkpoint(result.last_checkpoint)["epoch"] == 2


def test_allowed_change_keeps_every_subject_trained_on(half_run, tiny_cohort, tmp_path):
    over, run, last = half_run
    first = load_checkpoint(last)
    other = write_brats_cohort(tmp_path / "other", n=5, scale=2.0)
    cfg = compose_train(
        [
            *over,
            f"data.cohorts=[{other}]",
            f"trainer.resume={last}",
            "+trainer.resume_allow_changes=true",
        ]
    )
    train_from_config(cfg, run)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 2
    n_first = len(first["train_subjects"])
    assert len(ckpt["train_subjects"]) == n_first + len(ckpt["run_train_subjects"])
    assert [h["epoch"] for h in ckpt["resume_history"]] == [1]
    assert any("data.cohorts" in c for c in ckpt["resume_history"][0]["changes"])
    assert str(tiny_cohort.resolve()) in ckpt["cohorts"]
    # aad-compare's overlap warning still counts the first cohort's training subjects.
    assert train_overlap(load_cohort(tiny_cohort), ckpt) == n_first > 0


def test_config_differences_ignore_loading_keys():
    saved = {"seed": 0, "data": {"cohorts": ["/a"], "num_workers": 4, "cache": "memory"}}
    now = {"seed": 0, "data": {"cohorts": ["/a"], "num_workers": 0, "cache": "disk"}}
    assert resume_config_differences(saved, now) == []
    now["data"]["cohorts"] = ["/a", "/b"]
    assert resume_config_differences(saved, now) == ["data.cohorts (['/a'] -> ['/a', '/b'])"]


def test_refusal_names_the_allow_key_as_the_config_needs_it(tmp_path):
    from aad_med.training.checkpoint import check_resume_compatible

    saved = {"config": {"seed": 0, "trainer": {}}}
    with pytest.raises(CheckpointError, match=r"set \+trainer\.resume_allow_changes=true"):
        check_resume_compatible(tmp_path / "x.pt", saved, {"seed": 1, "trainer": {}})
    declared = {"seed": 1, "trainer": {"resume_allow_changes": False}}
    with pytest.raises(CheckpointError, match=r"or set trainer\.resume_allow_changes=true"):
        check_resume_compatible(tmp_path / "x.pt", saved, declared)
    allowed = {"seed": 1, "trainer": {"resume_allow_changes": True}}
    assert check_resume_compatible(tmp_path / "x.pt", saved, allowed) == ["seed (0 -> 1)"]
