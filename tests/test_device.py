"""The one device resolver: auto, cpu, cuda, cuda:N and torch.device; clear errors naming the
config key."""

from __future__ import annotations

import pytest
import torch

from aad_med.device import resolve_device
from aad_med.errors import ConfigError


def test_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA GPU"):
        resolve_device("cuda", key="trainer.device")
    with pytest.raises(ConfigError, match="device must be auto, cpu or cuda, got 'tpu'"):
        resolve_device("tpu")


def test_cuda_means_this_ranks_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_an_explicit_gpu_index_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    # Every rank would take cuda:1 (NCCL: duplicate GPU); plain cuda is this rank's own.
    with pytest.raises(ConfigError, match="trainer.device=cuda:1 under torchrun.*CUDA_VISIBLE"):
        resolve_device("cuda:1", key="trainer.device")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
