"""Checkpoints: primitive content, atomic writes, safe loading (pickle payloads never run)."""

from __future__ import annotations

import builtins
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.errors import CheckpointError
from aad_med.models import ConvAutoencoder
from aad_med.training import checkpoint as ck


def _state(model: torch.nn.Module | None = None) -> dict:
    model = model or ConvAutoencoder(channels=(4, 8), strides=(2, 2), patch_size=8, latent_dim=3)
    return {
        "format": ck.CHECKPOINT_FORMAT,
        "format_version": ck.FORMAT_VERSION,
        "model_state": model.state_dict(),
        "model_config": model.model_config(),
        "preprocessing": PreprocessingConfig(patch_size=8).to_dict(),
        "epoch": np.int64(3),
        "loss": np.float32(0.5),
        "train_subject_ids": ("a", "b"),
        "cohorts": [Path("/data/c1")],
        "rng": ck.capture_rng_state(),
    }


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the payload ever runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def test_round_trip_converts_to_primitives(tmp_path):
    path = ck.save_checkpoint(tmp_path / "c.pt", _state())
    out = ck.load_checkpoint(path)
    assert out["epoch"] == 3 and type(out["epoch"]) is int
    assert type(out["loss"]) is float
    assert out["train_subject_ids"] == ["a", "b"]
    assert out["cohorts"] == ["/data/c1"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"], "no temp file left behind"


def test_to_primitive_flattens_subclasses_of_primitives(tmp_path):
    import enum

    class Level(enum.IntEnum):
        HIGH = 2

    out = ck.to_primitive({"v": torch.__version__, "l": Level.HIGH, "b": np.bool_(True)})
    assert type(out["v"]) is str and type(out["l"]) is int and out["b"] is True
    ck.save_checkpoint(tmp_path / "s.pt", {**_state(), **out})
    assert ck.load_checkpoint(tmp_path / "s.pt")["v"] == str(torch.__version__)


def test_to_primitive_refuses_objects():
    with pytest.raises(TypeError, match="cannot store object"):
        ck.to_primitive({"x": object()})


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = ck.save_checkpoint(tmp_path / "last.pt", _state())
    before = path.read_bytes()

    def boom(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(path, _state())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_copy_checkpoint_and_stale_temp_cleanup(tmp_path):
    last = ck.save_checkpoint(tmp_path / "last.pt", _state())
    best = ck.copy_checkpoint(last, tmp_path / "best.pt")
    assert best.read_bytes() == last.read_bytes()
    ck.save_checkpoint(last, {**_state(), "epoch": 9})
    assert ck.load_checkpoint(best)["epoch"] == 3, "best is not changed by rewriting last"
    stale = tmp_path / ".last.pt.tmp-123-abcd"
    stale.write_bytes(b"torn")
    assert ck.remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists()


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    obj = {**_state(), "extra": _Payload(marker)}
    if writer == "torch.save":
        torch.save(obj, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a safe aad-med checkpoint") as e:
        ck.load_checkpoint(evil)
    assert "open" in str(e.value) or "Unsupported" in str(e.value), str(e.value)
    assert not marker.exists(), "the payload ran"
    with pytest.raises(CheckpointError, match="not a safe"):
        ck.load_model_from_checkpoint(evil)
    assert not marker.exists()
    # Control: the payload is real, unsafe loading would run it.
    if writer == "torch.save":
        torch.load(evil, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "does not exist"),
        (b"", "not a readable checkpoint"),
        (b"PK\x03\x04garbage", "not a readable checkpoint"),
        ("truncated", "not a readable checkpoint"),
        ({"model_state": {}}, "not an aad-med checkpoint"),
        ([1, 2, 3], "not an aad-med checkpoint"),
        ({"format": ck.CHECKPOINT_FORMAT, "format_version": 99}, "newer than"),
        ({"format": ck.CHECKPOINT_FORMAT, "format_version": 1}, "lacks model_state"),
    ],
)
def test_unusable_files_raise_checkpoint_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        ck.save_checkpoint(path, _state())
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match) as e:
        ck.load_checkpoint(path)
    assert str(e.value).startswith(str(path))
    assert "\n" not in str(e.value)


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    state = ck.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.save_checkpoint(tmp_path / "r.pt", {**_state(), "rng": state})
    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    ck.restore_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_load_model_from_checkpoint_rebuilds_model_and_preprocessing(tmp_path):
    torch.manual_seed(0)
    model = ConvAutoencoder(channels=(4, 8), strides=(2, 2), patch_size=8, latent_dim=3)
    ck.save_checkpoint(tmp_path / "m.pt", _state(model))
    loaded, prep, ckpt = ck.load_model_from_checkpoint(tmp_path / "m.pt")
    assert prep == PreprocessingConfig(patch_size=8)
    assert not loaded.training
    x = torch.randn(2, 4, 8, 8, 8)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert ckpt["train_subject_ids"] == ["a", "b"]


def test_weights_not_matching_config_raise_checkpoint_error(tmp_path):
    state = _state()
    state["model_config"] = {**state["model_config"], "latent_dim": 7}
    ck.save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointError, match="model cannot be rebuilt"):
        ck.load_model_from_checkpoint(tmp_path / "bad.pt")
    state = _state()
    state["preprocessing"] = {**state["preprocessing"], "channels": ["t1"]}
    ck.save_checkpoint(tmp_path / "badprep.pt", state)
    with pytest.raises(CheckpointError, match="invalid preprocessing"):
        ck.load_model_from_checkpoint(tmp_path / "badprep.pt")
