"""The training loop in-process: exact resume, loss falls, NaN stop, early stopping, run-folder
guard, unsafe resume checkpoints; and its small pure pieces."""

from __future__ import annotations

import builtins
import math

import pytest
import torch

from aad_med.errors import CheckpointError, ConfigError
from aad_med.pipelines.train import train_from_config
from aad_med.training import loop as loop_mod
from aad_med.training.checkpoint import load_checkpoint
from aad_med.training.loop import (
    NonFiniteLossError,
    _rebatch,
    lr_lambda_factory,
    reconstruction_loss,
)
from tests.training.conftest import AUGMENT, compose_train, tiny_overrides

# Every source of randomness on: VAE sampling, dropout, augmentation, tumour-centred patches.
RANDOM_EVERYTHING = {"model": "vae", "model.dropout": 0.2, "data.augment": AUGMENT}


def _weights(path):
    return load_checkpoint(path)["model_state"]


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_after_one_epoch_is_bitwise_equal(tiny_cohort, tmp_path):
    over = tiny_overrides(tiny_cohort, tmp_path, **RANDOM_EVERYTHING)
    full = train_from_config(compose_train(over), tmp_path / "full")
    half = train_from_config(compose_train([*over, "trainer.epochs_per_run=1"]), tmp_path / "half")
    assert len(half.history) == 1
    last = tmp_path / "half" / "checkpoints" / "last.pt"
    resumed = train_from_config(compose_train([*over, f"trainer.resume={last}"]), tmp_path / "half")
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    _assert_bitwise_equal(_weights(full.last_checkpoint), _weights(last))
    a, b = load_checkpoint(full.last_checkpoint), load_checkpoint(last)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    assert a["scheduler_state"]["last_epoch"] == b["scheduler_state"]["last_epoch"]
    for sa, sb in zip(
        a["optimizer_state"]["state"].values(), b["optimizer_state"]["state"].values(), strict=True
    ):
        _assert_bitwise_equal(sa, sb)


def test_checkpoint_records_what_comparison_needs(tiny_cohort, tmp_path):
    result = train_from_config(
        compose_train(tiny_overrides(tiny_cohort, tmp_path, **{"trainer.max_epochs": 1})),
        tmp_path / "run",
    )
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt["preprocessing"]["patch_size"] == 8
    assert ckpt["preprocessing"]["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert ckpt["model_config"]["latent_dim"] == 4
    assert len(ckpt["train_subject_ids"]) == 4 and len(ckpt["val_subject_ids"]) == 1
    assert not set(ckpt["train_subject_ids"]) & set(ckpt["val_subject_ids"])
    assert ckpt["cohorts"] == [str(tiny_cohort.resolve())]
    assert ckpt["config"]["data"]["patch_size"] == 8
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_loss_falls(tiny_cohort, tmp_path):
    over = tiny_overrides(
        tiny_cohort,
        tmp_path,
        **{"trainer.max_epochs": 6, "optim.optimizer.lr": 0.01, "data.samples_per_subject": 4},
    )
    result = train_from_config(compose_train(over), tmp_path / "run")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
    assert result.best_loss == min(h["val_loss"] for h in result.history)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cohort, tmp_path, monkeypatch):
    over = tiny_overrides(tiny_cohort, tmp_path, **{"trainer.max_epochs": 3})
    real = loop_mod.reconstruction_loss
    calls = {"n": 0}

    def poisoned(x_hat, x, kind="mse", mask=None):
        calls["n"] += 1
        loss = real(x_hat, x, kind, mask)
        # Epoch 1 has 2 steps (4 subjects x 2 patches, batch 4) plus 1 validation step.
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(loop_mod, "reconstruction_loss", poisoned)
    with pytest.raises(
        NonFiniteLossError, match=r"loss became nan at epoch 2.*last good checkpoint"
    ):
        train_from_config(compose_train(over), tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model_state"].values())


def test_early_stopping(tiny_cohort, tmp_path):
    over = tiny_overrides(
        tiny_cohort,
        tmp_path,
        **{
            "trainer.max_epochs": 5,
            "optim.optimizer.lr": 0.0,
            "trainer.early_stopping_patience": 1,
        },
    )
    result = train_from_config(compose_train(over), tmp_path / "run")
    assert result.stopped_early and len(result.history) == 2


def test_run_folder_with_results_is_never_overwritten_silently(tiny_cohort, tmp_path):
    over = tiny_overrides(tiny_cohort, tmp_path, **{"trainer.max_epochs": 1})
    run = tmp_path / "run"
    train_from_config(compose_train(over), run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds results.*overwrite=true"):
        train_from_config(compose_train([*over, "seed=5"]), run)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    train_from_config(compose_train([*over, "seed=5", "overwrite=true"]), run)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["seed"] == 5


def test_resume_refuses_pickle_payload_and_other_model(tiny_cohort, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (builtins.open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "aad-med-checkpoint", "x": Payload()}, evil)
    over = tiny_overrides(tiny_cohort, tmp_path, **{"trainer.max_epochs": 1})
    with pytest.raises(CheckpointError, match="not a safe aad-med checkpoint"):
        train_from_config(compose_train([*over, f"trainer.resume={evil}"]), tmp_path / "r1")
    assert not marker.exists()
    train_from_config(compose_train(over), tmp_path / "r2")
    other = compose_train(
        [*over, "model.latent_dim=5", f"trainer.resume={tmp_path}/r2/checkpoints/last.pt"]
    )
    with pytest.raises(CheckpointError, match="differs from the configured model"):
        train_from_config(other, tmp_path / "r3")


def test_ddp_config_without_torchrun_is_a_config_error(tiny_cohort, tmp_path):
    over = tiny_overrides(tiny_cohort, tmp_path, **{"trainer": "ddp"})
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        train_from_config(compose_train(over), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_reconstruction_loss_brain_only():
    x = torch.zeros(1, 4, 2, 2, 2)
    x_hat = torch.ones(1, 4, 2, 2, 2)
    mask = torch.zeros(1, 1, 2, 2, 2)
    mask[..., 0] = 1
    x_hat[..., 1] = 3.0  # error outside the brain must not count
    assert reconstruction_loss(x_hat, x, "mse", mask).item() == pytest.approx(1.0)
    assert reconstruction_loss(x_hat, x, "mse").item() == pytest.approx(5.0)
    assert reconstruction_loss(x_hat, x, "l1").item() == pytest.approx(2.0)
    # Each patch weighs the same, whatever its brain volume: a batch's loss is the mean of
    # its halves' losses (what DDP averages).
    xs, ys = torch.randn(4, 4, 2, 2, 2), torch.randn(4, 4, 2, 2, 2)
    ms = (torch.rand(4, 1, 2, 2, 2) > 0.3).float()
    halves = [
        reconstruction_loss(xs[i : i + 2], ys[i : i + 2], "mse", ms[i : i + 2]) for i in (0, 2)
    ]
    whole = reconstruction_loss(xs, ys, "mse", ms)
    assert whole.item() == pytest.approx((halves[0] + halves[1]).item() / 2)


def test_warmup_then_cosine():
    f = lr_lambda_factory(total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1)
    values = [f(s) for s in range(2, 11)]
    assert values == sorted(values, reverse=True)


def test_rebatch_gives_exact_batches():
    loader = [{"image": torch.full((3, 1), float(i)), "brain": torch.ones(3, 1)} for i in range(3)]
    sizes = [x.shape[0] for x, _ in _rebatch(loader, 4)]
    assert sizes == [4, 4, 1]
    flat = torch.cat([x for x, _ in _rebatch(loader, 4)]).flatten().tolist()
    assert flat == [0, 0, 0, 1, 1, 1, 2, 2, 2]
