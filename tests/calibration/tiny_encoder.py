"""A tiny trained autoencoder checkpoint in aad-train's format, for calibration and real-scan
tests (the pattern of tests/cli/test_compare.py: a few epochs of an MSE autoencoder)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from aad_med.data.datasets import build_train_dataset, train_collate
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.validation import load_cohort
from aad_med.models import ConvAutoencoder
from aad_med.training.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, save_checkpoint


def train_tiny_checkpoint(
    path: Path,
    train_dirs: Path | Sequence[Path],
    preprocessing: PreprocessingConfig,
    epochs: int = 4,
    latent_dim: int = 8,
    samples_per_subject: int = 4,
) -> Path:
    """Train a (8, 16)-channel autoencoder for ``epochs`` on the cohorts in ``train_dirs`` and
    save it as an aad-med checkpoint at ``path``."""
    dirs = [train_dirs] if isinstance(train_dirs, str | Path) else list(train_dirs)
    subjects, ids = [], []
    for d in dirs:
        cohort = load_cohort(d)
        subjects.extend(cohort.subjects)
        ids.extend(cohort.subject_ids)
    ds = build_train_dataset(
        subjects, preprocessing, samples_per_subject=samples_per_subject, cache="memory", seed=0
    )
    torch.manual_seed(0)
    model = ConvAutoencoder(
        channels=(8, 16),
        strides=(2, 2),
        latent_dim=latent_dim,
        patch_size=preprocessing.patch_size,
        num_res_units=0,
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=4,
        shuffle=True,
        collate_fn=train_collate,
        generator=torch.Generator().manual_seed(0),
    )
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            x = batch["image"]
            loss = torch.mean((model(x) - x) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_checkpoint(
        path,
        {
            "format": CHECKPOINT_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_state": model.state_dict(),
            "model_config": model.model_config(),
            "preprocessing": preprocessing.to_dict(),
            "train_subject_ids": ids,
        },
    )
