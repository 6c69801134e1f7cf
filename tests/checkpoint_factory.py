"""Tiny ConvAutoencoder checkpoints in ``aad-train``'s format, written into tmp dirs by tests
(the checkpoint counterpart of ``nifti_factory``): an untrained one where only input checks or
the determinism of the pipeline matter, a briefly trained one where the latents must mean
something."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from aad_med.data.datasets import build_train_dataset, train_collate
from aad_med.data.preprocessing import PreprocessingConfig
from aad_med.data.validation import load_cohort
from aad_med.models import ConvAutoencoder
from aad_med.training.checkpoint import save_model_checkpoint

TINY_PATCH = 8


def write_tiny_checkpoint(
    path: Path,
    seed: int = 0,
    latent_dim: int = 4,
    model_patch: int = TINY_PATCH,
    **preprocessing: object,
) -> Path:
    """An untrained (4, 8)-channel autoencoder on ``model_patch``³ patches (8³ by default).

    The recorded preprocessing uses 8³ patches and ``min_brain_fraction=0.25``; the keyword
    arguments in ``preprocessing`` override its fields (a ``patch_size`` other than
    ``model_patch`` makes a checkpoint that does not match its own model).
    """
    torch.manual_seed(seed)
    model = ConvAutoencoder(
        channels=(4, 8),
        strides=(2, 2),
        latent_dim=latent_dim,
        patch_size=model_patch,
        num_res_units=0,
    )
    pre = PreprocessingConfig(patch_size=TINY_PATCH, min_brain_fraction=0.25).to_dict()
    pre.update(preprocessing)
    return save_model_checkpoint(path, model, pre, train_subject_ids=[], train_subjects=[])


def train_tiny_checkpoint(
    path: Path,
    train_dirs: Path | Sequence[Path],
    preprocessing: PreprocessingConfig,
    epochs: int = 4,
    latent_dim: int = 8,
    samples_per_subject: int = 4,
    feature_reference: bool = False,
) -> Path:
    """Train a (8, 16)-channel MSE autoencoder for ``epochs`` on the cohorts in ``train_dirs``
    and save it, with their subject IDs as ``train_subject_ids``, at ``path``; with
    ``feature_reference``, also the fixed feature scale ``aad-train`` stores (fitted on the
    training subjects)."""
    dirs = [train_dirs] if isinstance(train_dirs, str | Path) else list(train_dirs)
    subjects, ids, places = [], [], []
    for d in dirs:
        cohort = load_cohort(d)
        subjects.extend(cohort.subjects)
        ids.extend(cohort.subject_ids)
        # as aad-train records them: the overlap check matches place and ID
        places.extend(
            {"cohort": str(Path(d).resolve()), "subject_id": sid} for sid in cohort.subject_ids
        )
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
    extra = {}
    if feature_reference:
        from aad_med.data.records import Cohort
        from aad_med.embedding.standardize import reference_from_subjects

        model.eval()
        cohort = Cohort(path=Path(dirs[0]), layout="training", subjects=subjects)
        extra["feature_reference"] = reference_from_subjects(model, cohort, preprocessing)
    return save_model_checkpoint(
        path,
        model,
        preprocessing.to_dict(),
        train_subject_ids=ids,
        train_subjects=places,
        **extra,
    )
