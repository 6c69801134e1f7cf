"""A run whose first epoch diverges leaves nothing that looks resumable: no config.yaml, no
empty checkpoints/ folder, so a later run into the same folder is not told to resume from a
last.pt that was never written."""

from __future__ import annotations

import pytest

from aad_med.pipelines.rundir import existing_results
from aad_med.pipelines.train import train_from_config
from aad_med.training import loop as loop_mod
from aad_med.training.loop import NonFiniteLossError
from tests.training.conftest import compose_train, tiny_overrides


def test_first_epoch_divergence_leaves_no_resumable_looking_folder(
    tiny_cohort, tmp_path, monkeypatch
):
    over = tiny_overrides(tiny_cohort, tmp_path, **{"trainer.max_epochs": 2})
    real = loop_mod.reconstruction_loss
    monkeypatch.setattr(
        loop_mod,
        "reconstruction_loss",
        lambda x_hat, x, kind="mse", mask=None: real(x_hat, x, kind, mask) * float("nan"),
    )
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at epoch 1") as e:
        train_from_config(compose_train(over), run)
    msg = str(e.value)
    assert "nothing to resume" in msg and "last.pt" not in msg
    assert existing_results(run) == []
    assert not (run / "checkpoints").exists()
    monkeypatch.setattr(loop_mod, "reconstruction_loss", real)
    # The same folder is usable again without overwrite=true or a resume hint.
    result = train_from_config(compose_train(over), run)
    assert result.last_checkpoint == run / "checkpoints" / "last.pt"
