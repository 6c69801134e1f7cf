"""The shared set-up of the example notebooks (``notebooks/``): a work folder, the demo cohorts
and a small encoder trained on them, each written once here instead of in every notebook; and the
untrained tiny encoder the benchmark scripts' ``--quick`` modes share.

Small by default so each notebook runs in about a minute on a laptop CPU;
``AAD_MED_NOTEBOOK_DIR`` and ``AAD_MED_NOTEBOOK_SUBJECTS`` change the folder and the cohort size
(the notebook tests set both). Not used by the commands.
"""

from __future__ import annotations

import os
from pathlib import Path

SHAPE: tuple[int, int, int] = (48, 56, 44)
"""Volume shape of the demo cohorts (voxels)."""

DEMO_SITES: dict[str, str] = {"site_a": "reference", "site_a2": "reference", "site_b": "site_b"}
"""The compared demo cohorts and their synthetic sites: site_a2 is site_a's site with other
subjects; site_b shares site_a's anatomy seeds with another scanner."""


def work_dir() -> Path:
    """The notebooks' work folder (``$AAD_MED_NOTEBOOK_DIR``, else ``outputs/notebooks``), created."""
    work = Path(os.environ.get("AAD_MED_NOTEBOOK_DIR", "outputs/notebooks")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return work


def n_subjects() -> int:
    """Subjects per demo cohort (``$AAD_MED_NOTEBOOK_SUBJECTS``, else 8)."""
    return int(os.environ.get("AAD_MED_NOTEBOOK_SUBJECTS", 8))


def demo_cohorts(data_dir: Path, n: int, shape: tuple[int, int, int] = SHAPE) -> Path:
    """Write the demo cohorts into ``data_dir`` (those already there are kept): the three of
    :data:`DEMO_SITES` with ``n`` subjects each, and ``train`` (2n reference + n scanner_b
    subjects, other anatomy seeds). Returns ``data_dir``."""
    from aad_med.data.synthetic import generate_cohort

    data_dir = Path(data_dir)
    for name, site in DEMO_SITES.items():
        if not (data_dir / name).exists():
            start = n if name == "site_a2" else 0
            generate_cohort(
                data_dir / name, n_subjects=n, site=site, seed=0, shape=shape, start_index=start
            )
    if not (data_dir / "train").exists():
        train = data_dir / "train"
        generate_cohort(train, n_subjects=2 * n, site="reference", seed=1, shape=shape)
        generate_cohort(
            train, n_subjects=n, site="scanner_b", seed=1, shape=shape, start_index=2 * n
        )
    return data_dir


def train_small_encoder(train_dir: Path, run_dir: Path, work: Path):
    """Train the notebooks' small encoder (patch 16, latent 16, 3 CPU epochs) on ``train_dir``
    into ``run_dir`` with ``aad-train``'s own config and pipeline; returns its ``FitResult``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from aad_med.pipelines.rundir import register_resolvers
    from aad_med.pipelines.train import train_from_config
    from aad_med.resources import CONFIG_DIR

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                f"data.cohorts=[{train_dir}]",
                "data.patch_size=16",
                "data.samples_per_subject=8",
                "model.channels=[8,16]",
                "model.strides=[2,2]",
                "model.latent_dim=16",
                "trainer=cpu",
                "trainer.max_epochs=3",
                "trainer.batch_size=16",
                "trainer.progress=false",
                "logger=none",
                "overwrite=true",
                f"paths.output_dir={work}",
                f"paths.data_dir={work / 'data'}",
            ],
        )
    return train_from_config(cfg, run_dir)


def quick_model(patch: int = 8):
    """An untrained tiny encoder for the benchmark scripts' ``--quick`` mode (the test suite):
    it measures the plumbing only."""
    import torch

    from aad_med.models import ConvAutoencoder

    torch.manual_seed(0)
    return ConvAutoencoder(
        channels=(4, 8), strides=(2, 2), latent_dim=6, patch_size=patch, num_res_units=0,
        norm="BATCH",
    ).eval()  # fmt: skip
