"""aad-med: the Autoencoder Average Distance between cohorts of volumetric brain MRI.

The package reads as the pipeline: ``data`` (cohort discovery, validation, MONAI transforms, patches,
artefacts, synthetic cohorts) -> ``models`` (the autoencoder) -> ``training`` (loop,
checkpoints) -> ``embedding`` (cohort -> per-subject vectors) -> ``distances`` (AAD and its
statistics) -> ``calibration`` -> ``plots`` / ``report`` (figures, writers). ``pipelines`` holds
the body of each command (train, compare, calibrate, embed) and ``cli`` the thin entry points;
no stage imports from either.
"""

__version__ = "0.1.0"

CHANNELS: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Canonical channel order used everywhere (images, checkpoints, reports)."""

DEFAULT_FEATURES = "multiscale+input_texture+intensity_shape"
"""The feature set every API and command embeds with unless told otherwise (chosen by
``scripts/sensitivity.py`` at the project's default patch size and model: it sees noise, blur,
gamma and population shifts the plain ``latent`` mean misses; BENCHMARKS.md). Defined
here, not in :mod:`aad_med.embedding.features`, so commands can name it before importing torch."""
