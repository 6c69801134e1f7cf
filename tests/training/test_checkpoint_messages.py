"""Checkpoint refusals say what is wrong with which file: NaN/Inf weights, a folder, a device, a
broken link, a pickle (never with torch's advice to load with weights_only=False), and a
preprocessing record that cannot work (negative eval_stride, absurd spacing or patch size)."""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import pytest
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.errors import CheckpointError
from aad_med.models import ConvAutoencoder
from aad_med.training import checkpoint as ck


def _state() -> dict:
    model = ConvAutoencoder(channels=(4, 8), strides=(2, 2), patch_size=8, latent_dim=3)
    return {
        "format": ck.CHECKPOINT_FORMAT,
        "format_version": ck.FORMAT_VERSION,
        "model_state": model.state_dict(),
        "model_config": model.model_config(),
        "preprocessing": PreprocessingConfig(patch_size=8).to_dict(),
    }


def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_checkpoint(tmp_path, bad):
    state = _state()
    name = next(k for k, v in state["model_state"].items() if v.is_floating_point())
    state["model_state"][name] = state["model_state"][name].clone().fill_(bad)
    path = ck.save_checkpoint(tmp_path / "diverged.pt", state)
    with pytest.raises(CheckpointError, match=r"NaN/Inf value\(s\) in 1 tensor") as e:
        ck.load_model_from_checkpoint(path)
    msg = _one_line(e, path)
    assert name in msg and "cohort" not in msg


def test_folder_is_reported_as_a_folder(tmp_path):
    folder = tmp_path / "ckpt.pt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder") as e:
        ck.load_checkpoint(folder)
    assert "does not exist" not in _one_line(e, folder)
    assert ck.checkpoint_path_problem(folder).endswith("expected a checkpoint file (.pt)")


def test_broken_link_and_device_are_named(tmp_path):
    link = tmp_path / "last.pt"
    link.symlink_to(tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match="broken symbolic link") as e:
        ck.load_checkpoint(link)
    _one_line(e, link)
    if os.path.exists("/dev/zero"):
        # torch.load would read /dev/zero forever.
        with pytest.raises(CheckpointError, match="not a regular file"):
            ck.load_checkpoint("/dev/zero")


class _Payload:
    def __reduce__(self):
        return (builtins.print, ("payload ran",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pickle_refusal_never_advises_weights_only_false(tmp_path, protocol, recwarn):
    path = tmp_path / f"evil{protocol}.pt"
    path.write_bytes(pickle.dumps({"format": ck.CHECKPOINT_FORMAT, "x": _Payload()}, protocol))
    with pytest.raises(CheckpointError, match="not a safe aad-med checkpoint") as e:
        ck.load_checkpoint(path)
    msg = _one_line(e, path)
    assert "weights_only` set to `False" not in msg and "weights_only=False" not in msg
    assert "Re-running" not in msg and "\x1b" not in msg
    # The refused operation is named, not an empty reason.
    assert not msg.endswith("loading: )")
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("eval_stride", -4, "eval_stride=-4"),
        ("eval_stride", 0, "eval_stride=0"),
        ("eval_stride", 2.5, "eval_stride=2.5"),
        ("spacing", [0.01, 0.01, 0.01], "spacing="),
        ("spacing", [1.0, float("nan"), 1.0], "spacing="),
        ("spacing", [1.0, 1.0], "spacing="),
        ("patch_size", 100000, "patch_size=100000"),
        ("patch_size", -8, "patch_size=-8"),
    ],
)
def test_unusable_preprocessing_record_names_the_checkpoint(tmp_path, key, value, match):
    state = _state()
    state["preprocessing"][key] = value
    path = ck.save_checkpoint(tmp_path / "odd.pt", state)
    with pytest.raises(CheckpointError, match=f"invalid preprocessing record: {match}") as e:
        ck.load_model_from_checkpoint(path)
    _one_line(e, path)


def test_sane_checkpoint_still_loads_with_weights_only(tmp_path):
    path = ck.save_checkpoint(tmp_path / "ok.pt", _state())
    model, prep, _ = ck.load_model_from_checkpoint(path)
    assert prep.patch_size == 8 and not model.training
    assert torch.load(path, weights_only=True)["format"] == ck.CHECKPOINT_FORMAT
