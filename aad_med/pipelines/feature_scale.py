"""A step of ``aad-compare`` and ``aad-calibrate``: which fixed scale the feature vectors get.

In order: the checkpoint's ``feature_reference`` (written by ``aad-train`` over the encoder's
training and validation subjects), a reference cohort the user names (``embedding.reference``,
for checkpoints made before that; cached), else the pooled standardisation over the compared
subjects, which makes a pair's AAD depend on the other cohorts of the call. The label
(``"checkpoint"``, ``"reference"``, ``"pooled"``) goes into ``distances.json`` as ``scale``.
The work is in :mod:`aad_med.embedding.standardize`; this module only chooses.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from aad_med.errors import CohortError, InputError

log = logging.getLogger("aad_med.scale")


def attach_reference(
    feature_set,
    ckpt: Mapping,
    model=None,
    preprocessing=None,
    reference_cohort: str | Path | None = None,
    checkpoint_hash: str | None = None,
    cache_dir: str | Path | None = None,
    device="cpu",
    batch_size: int = 32,
) -> str:
    """Set ``feature_set.reference`` from the checkpoint or a reference cohort.

    Args:
        feature_set: the feature set instance the comparison embeds with (changed in place).
        ckpt: the loaded checkpoint dict.
        model, preprocessing: the checkpoint's model and preprocessing (for a reference cohort).
        reference_cohort: folder or CSV of reference subjects (``embedding.reference``), used
            when the checkpoint has no reference for every block of ``feature_set``.
        checkpoint_hash, cache_dir: key and folder of the reference cache.
        device, batch_size: how the reference cohort is encoded.

    Returns:
        ``"checkpoint"``, ``"reference"``, ``"pooled"`` or ``"raw"`` (``latent``: never
        standardised).

    Raises:
        InputError / CohortError: the reference cohort cannot be read or is invalid.
    """
    from aad_med.embedding.standardize import (
        SCALE_CHECKPOINT,
        SCALE_POOLED,
        SCALE_RAW,
        SCALE_REFERENCE,
        cohort_reference,
        missing_blocks,
        supports_reference,
    )

    feature_set.reference = None
    if feature_set.name == "latent":
        return SCALE_RAW  # mean patch latents, not standardised: nothing depends on the call
    if not supports_reference(feature_set):
        return SCALE_POOLED  # position_matched standardises per position over the subjects
    stored = ckpt.get("feature_reference")
    if stored and not missing_blocks(feature_set, stored):
        feature_set.reference = dict(stored)
        return SCALE_CHECKPOINT
    if reference_cohort:
        from aad_med.data.validation import load_cohort

        path = Path(reference_cohort)
        if not path.exists():
            raise InputError(path, "reference cohort (embedding.reference) does not exist")
        cohort = load_cohort(path)
        if len(cohort.subjects) < 2:
            raise CohortError([f"{path}: a reference cohort needs at least 2 subjects"])
        feature_set.reference = cohort_reference(
            model,
            cohort,
            preprocessing,
            feature_set,
            checkpoint_hash,
            cache_dir,
            device,
            batch_size,
        )
        return SCALE_REFERENCE
    log.warning(
        "the checkpoint has no feature_reference for %s and no embedding.reference was given: "
        "features are standardised over the compared subjects, so a pair's AAD depends on the "
        "other cohorts of this call (scale: pooled)",
        feature_set.name,
    )
    return SCALE_POOLED


__all__ = ["attach_reference"]
