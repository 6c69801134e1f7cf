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
